//! `rigger maintenance on|off`, the same on every provider: the mode is recorded first, where
//! a web server that starts meanwhile reads it (AWS: SSM; locally every web server shares the
//! page itself), then every web server is switched with the same job
//! (`rigger_recipes::operations::maintenance_line`: nginx answers 503 with the release's page
//! or rigger's while the health path stays green). A server that could not be switched is
//! named; running the command again converges (both directions may be repeated).

use std::fmt;
use std::future::Future;

use crate::progress::Progress;

/// What switching the web servers did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switched {
    /// Each web server (or set of servers sharing one page), and why it failed, if it did.
    Servers(Vec<(String, Result<(), String>)>),
    /// Nothing could be switched, and why (an emulator's servers do not run).
    Skipped(String),
}

/// How a provider records the mode and switches its web servers.
pub trait MaintenanceTarget: Send {
    type Error: Send + fmt::Display;

    /// Records the mode for servers that start from now on.
    fn record(&mut self, on: bool) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Switches every running web server.
    fn switch_web_servers(
        &mut self,
        on: bool,
    ) -> impl Future<Output = Result<Switched, Self::Error>> + Send;
}

/// Why maintenance mode is not (entirely) what was asked.
#[derive(Debug)]
pub enum MaintenanceError<E> {
    Provider(E),
    /// Recorded, but some web servers were not switched.
    Partly {
        on: bool,
        total: usize,
        failures: Vec<String>,
    },
}

impl<E: fmt::Display> fmt::Display for MaintenanceError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaintenanceError::Provider(error) => write!(f, "{error}"),
            MaintenanceError::Partly {
                on,
                total,
                failures,
            } => write!(
                f,
                "maintenance {} on {} of {total} web servers only; run the command again: {}",
                if *on { "on" } else { "off" },
                total - failures.len(),
                failures.join("; ")
            ),
        }
    }
}

/// Turns maintenance mode on or off.
pub async fn switch<T: MaintenanceTarget>(
    target: &mut T,
    on: bool,
    progress: &dyn Progress,
) -> Result<(), MaintenanceError<T::Error>> {
    target
        .record(on)
        .await
        .map_err(MaintenanceError::Provider)?;
    match target
        .switch_web_servers(on)
        .await
        .map_err(MaintenanceError::Provider)?
    {
        Switched::Skipped(why) => {
            progress.report(&format!("note: web servers not switched: {why}"));
            Ok(())
        }
        Switched::Servers(servers) => {
            let failures: Vec<String> = servers
                .iter()
                .filter_map(|(server, result)| {
                    result.as_ref().err().map(|why| format!("{server}: {why}"))
                })
                .collect();
            if failures.is_empty() {
                Ok(())
            } else {
                Err(MaintenanceError::Partly {
                    on,
                    total: servers.len(),
                    failures,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Web {
        calls: Vec<String>,
        answer: Switched,
    }

    impl MaintenanceTarget for Web {
        type Error = String;

        async fn record(&mut self, on: bool) -> Result<(), String> {
            self.calls.push(format!("record {on}"));
            Ok(())
        }

        async fn switch_web_servers(&mut self, on: bool) -> Result<Switched, String> {
            self.calls.push(format!("switch {on}"));
            Ok(self.answer.clone())
        }
    }

    #[tokio::test]
    async fn the_mode_is_recorded_before_any_server_is_switched_and_failures_are_named() {
        let mut web = Web {
            calls: Vec::new(),
            answer: Switched::Servers(vec![
                ("web-1".into(), Ok(())),
                ("web-2".into(), Err("exit 1: disk full".into())),
            ]),
        };
        let error = switch(&mut web, true, &crate::progress::Silent)
            .await
            .unwrap_err();
        assert_eq!(web.calls, ["record true", "switch true"]);
        assert_eq!(
            error.to_string(),
            "maintenance on on 1 of 2 web servers only; run the command again: web-2: exit 1: disk full"
        );
        web.answer = Switched::Servers(vec![("web-1".into(), Ok(()))]);
        switch(&mut web, false, &crate::progress::Silent)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn servers_that_do_not_run_are_a_note_not_a_failure() {
        let mut web = Web {
            calls: Vec::new(),
            answer: Switched::Skipped("the emulator's servers do not run".into()),
        };
        let lines = Mutex::new(Vec::new());
        let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
        switch(&mut web, true, &progress).await.unwrap();
        assert_eq!(
            *lines.lock().unwrap(),
            ["note: web servers not switched: the emulator's servers do not run"]
        );
    }
}
