//! Which servers a command on servers means (`rigger exec web`, `logs worker-1`, `manage`,
//! `ssh i-0a1`), the same on every provider: a provider lists its servers ([`Listed`]), these
//! functions choose among them.

/// A server as selectors see it.
#[derive(Debug, Clone, Copy)]
pub struct Listed<'a> {
    pub id: &'a str,
    /// Other names it answers to (an AWS server's instance id and status name, `web[1]`).
    pub aliases: &'a [String],
    pub roles: &'a [String],
    /// `in_service`, `pending`, `unhealthy`.
    pub state: &'a str,
}

impl Listed<'_> {
    fn is_named(&self, name: &str) -> bool {
        self.id == name || self.aliases.iter().any(|a| a == name)
    }

    fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// The indices of the servers `selectors` name: each selector is a role (every server with
/// it), a server id or one of its aliases; none selects every server. Unknown selectors are an
/// error listing the known roles and ids.
pub fn select(servers: &[Listed<'_>], selectors: &[String]) -> Result<Vec<usize>, String> {
    if selectors.is_empty() {
        return Ok((0..servers.len()).collect());
    }
    let mut chosen = vec![false; servers.len()];
    for selector in selectors {
        let mut matched = false;
        for (index, server) in servers.iter().enumerate() {
            if server.is_named(selector) || server.has_role(selector) {
                chosen[index] = true;
                matched = true;
            }
        }
        if !matched {
            let mut roles: Vec<&str> = servers
                .iter()
                .flat_map(|s| s.roles.iter().map(String::as_str))
                .collect();
            roles.sort_unstable();
            roles.dedup();
            return Err(format!(
                "no server or role `{selector}`; roles: {}; servers: {}",
                roles.join(", "),
                ids(servers).join(", ")
            ));
        }
    }
    Ok((0..servers.len()).filter(|i| chosen[*i]).collect())
}

/// The index of the server with this id or alias; the error lists the servers.
pub fn find(servers: &[Listed<'_>], name: &str) -> Result<usize, String> {
    servers
        .iter()
        .position(|s| s.is_named(name))
        .ok_or_else(|| {
            format!(
                "no server `{name}`; its servers are: {}",
                ids(servers).join(", ")
            )
        })
}

/// Where `rigger manage` runs: `--server` if given (it must run the app: a web or worker
/// server), else the first worker in service, else the first worker.
pub fn manage_server(servers: &[Listed<'_>], name: Option<&str>) -> Result<usize, String> {
    let runs_the_app = |s: &Listed<'_>| s.has_role("worker") || s.has_role("web");
    if let Some(name) = name {
        let index = find(servers, name)?;
        return if runs_the_app(&servers[index]) {
            Ok(index)
        } else {
            Err(format!(
                "{name} runs no app code; choose a worker or web server"
            ))
        };
    }
    let workers = || {
        servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.has_role("worker"))
    };
    workers()
        .find(|(_, s)| s.state == "in_service")
        .or_else(|| workers().next())
        .map(|(index, _)| index)
        .ok_or_else(|| "there is no worker server to run manage.py on".to_owned())
}

fn ids<'a>(servers: &[Listed<'a>]) -> Vec<&'a str> {
    servers.iter().map(|s| s.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// web-1 (alias i-0a1, web[1]), web-2, worker-1 (pending), worker-2, cache (and queue).
    fn with_fleet<T>(check: impl FnOnce(&[Listed<'_>]) -> T) -> T {
        let (web, worker, cache) = (
            names(&["web"]),
            names(&["worker"]),
            names(&["cache", "queue"]),
        );
        let none: Vec<String> = Vec::new();
        let web_1_aliases = names(&["i-0a1", "web[1]"]);
        let listed = |id, aliases, roles, state| Listed {
            id,
            aliases,
            roles,
            state,
        };
        let servers = [
            listed("web-1", &web_1_aliases, &web, "in_service"),
            listed("web-2", &none, &web, "in_service"),
            listed("worker-1", &none, &worker, "pending"),
            listed("worker-2", &none, &worker, "in_service"),
            listed("cache", &none, &cache, "in_service"),
        ];
        check(&servers)
    }

    fn check_select(selectors: &[&str], expected: Result<Vec<usize>, &str>) {
        let selectors = names(selectors);
        with_fleet(|servers| {
            assert_eq!(select(servers, &selectors), expected.map_err(str::to_owned));
        });
    }

    #[test]
    fn selectors_are_roles_or_ids_in_the_fleet_order() {
        check_select(&[], Ok(vec![0, 1, 2, 3, 4]));
        check_select(&["web"], Ok(vec![0, 1]));
        check_select(&["queue", "web-2"], Ok(vec![1, 4]));
        check_select(&["web", "web-1"], Ok(vec![0, 1]));
        check_select(&["i-0a1"], Ok(vec![0]));
        check_select(&["worker", "web[1]"], Ok(vec![0, 2, 3]));
        check_select(
            &["db"],
            Err(
                "no server or role `db`; roles: cache, queue, web, worker; servers: web-1, web-2, worker-1, worker-2, cache",
            ),
        );
    }

    #[test]
    fn manage_runs_on_a_worker_in_service_or_the_app_server_named() {
        with_fleet(|servers| {
            assert_eq!(manage_server(servers, None), Ok(3));
            assert_eq!(manage_server(servers, Some("web[1]")), Ok(0));
            assert_eq!(
                manage_server(servers, Some("cache")),
                Err("cache runs no app code; choose a worker or web server".to_owned())
            );
            assert!(
                manage_server(servers, Some("db-primary"))
                    .unwrap_err()
                    .starts_with("no server `db-primary`; its servers are: web-1, web-2")
            );
            assert_eq!(
                manage_server(&servers[..2], None),
                Err("there is no worker server to run manage.py on".to_owned())
            );
        });
    }
}
