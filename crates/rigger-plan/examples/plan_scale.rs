//! Measures the planner on an environment of 1,000 web servers against an observed world of
//! 1,000 (synthetic, in process). Run through `bench/plan-scale`.

use std::time::{Duration, Instant};

use rigger_plan::{Observed, ObservedResource, plan};
use rigger_topology::Value;

const CONFIG: &str = r#"
[project]
name = "bench"
app_path = "app"
wsgi_module = "bench.wsgi:application"
celery_app = "bench"
domains = ["bench.example.com"]

[environments.prod]
provider = "aws"
region = "us-east-1"
ami = "ami-0123456789abcdef0"
certificate = "arn:aws:acm:us-east-1:123456789012:certificate/bench"
admin_cidrs = ["203.0.113.0/24"]

[environments.prod.web]
min = 1000
desired = 1000
max = 1000

[environments.prod.database]
replicas = 3
"#;

fn main() {
    let config = rigger_config::parse(CONFIG, "bench.toml").expect("the bench config is valid");
    let topology = rigger_topology::desired(&config, "prod", "r2").unwrap();

    // The live world: everything applied at release r1, with 1% of the web servers drifted to
    // an older launch template, so the planner has real work to find.
    let mut observed = Observed::empty();
    for (n, resource) in topology.resources.iter().enumerate() {
        let mut attributes: std::collections::BTreeMap<String, Value> = resource
            .attributes
            .iter()
            .map(|(name, attribute)| (name.clone(), attribute.value.clone()))
            .collect();
        if n % 100 == 0 && attributes.contains_key("launch_template") {
            attributes.insert("launch_template".into(), Value::from("bench-prod-web-r0"));
        }
        let mut tags = resource.tags.clone();
        tags.insert("release".into(), "r1".into());
        observed.resources.insert(
            resource.id.clone(),
            ObservedResource {
                attributes,
                tags,
                depends_on: resource.depends_on.clone(),
            },
        );
    }

    let web_servers = topology
        .resources
        .iter()
        .filter(|r| {
            r.id.kind == rigger_topology::ResourceKind::GroupServer && r.tags["role"] == "web"
        })
        .count();
    let mut timings: Vec<Duration> = Vec::new();
    let mut last = None;
    for _ in 0..50 {
        let start = Instant::now();
        let result = plan(&observed, &topology);
        timings.push(start.elapsed());
        last = Some(result);
    }
    timings.sort();
    let summary = last.unwrap().summary();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "plan-scale: {} resources ({web_servers} web servers) vs {} observed: {} replace, {} no-op",
        topology.resources.len(),
        observed.resources.len(),
        summary.replace,
        summary.no_op
    );
    println!(
        "plan time over {} runs: median {:.2} ms, p90 {:.2} ms, max {:.2} ms (target < 50 ms)",
        timings.len(),
        ms(timings[timings.len() / 2]),
        ms(timings[timings.len() * 9 / 10]),
        ms(timings[timings.len() - 1])
    );
}
