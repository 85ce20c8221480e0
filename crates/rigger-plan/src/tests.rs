use std::collections::BTreeSet;

use rigger_topology::{Resource, ResourceId, ResourceKind, Topology, Value};

use super::*;
use crate::render::Style;

fn sg(name: &str) -> Resource {
    Resource::new(ResourceKind::SecurityGroup, name)
        .set_immutable("description", "rigger")
        .set(
            "ingress",
            Value::Set(BTreeSet::from(["tcp/80 from 0.0.0.0/0".to_owned()])),
        )
        .tag("role", "lb")
        .tag("release", "r1")
}

fn small_topology() -> Topology {
    let lb_sg = sg("p-e-lb-sg");
    let web_sg = sg("p-e-web-sg").depends_on(&lb_sg.id);
    let lb = Resource::new(ResourceKind::LoadBalancer, "p-e-lb")
        .set("health_check", "HTTPS:443/healthcheck.html")
        .depends_on(&lb_sg.id);
    let group = Resource::new(ResourceKind::AutoScalingGroup, "p-e-web")
        .set("desired", 2u32)
        .depends_on(&lb.id)
        .depends_on(&web_sg.id);
    Topology {
        project: "p".into(),
        environment: "e".into(),
        release: "r1".into(),
        resources: vec![lb_sg, web_sg, lb, group],
    }
}

/// The world as it would be right after applying `topology`.
fn observe(topology: &Topology) -> Observed {
    let mut observed = Observed::empty();
    for resource in &topology.resources {
        observed.resources.insert(
            resource.id.clone(),
            ObservedResource {
                attributes: resource
                    .attributes
                    .iter()
                    .map(|(name, attribute)| (name.clone(), attribute.value.clone()))
                    .collect(),
                tags: resource.tags.clone(),
                depends_on: resource.depends_on.clone(),
            },
        );
    }
    observed
}

fn id(kind: ResourceKind, name: &str) -> ResourceId {
    ResourceId::new(kind, name)
}

fn render(plan: &Plan) -> String {
    render::human(
        plan,
        Style {
            color: false,
            show_unchanged: true,
        },
    )
}

#[test]
fn first_creation_is_the_plan_against_an_empty_world() {
    let plan = plan(&Observed::empty(), &small_topology());
    insta::assert_snapshot!(render(&plan), @r#"
    Plan for p/e at release r1:

      + security_group p-e-lb-sg  (wave 0)
            description = "rigger"
            ingress     = {"tcp/80 from 0.0.0.0/0"}
      + security_group p-e-web-sg  (wave 1)
            description = "rigger"
            ingress     = {"tcp/80 from 0.0.0.0/0"}
      + load_balancer p-e-lb  (wave 1)
            health_check = "HTTPS:443/healthcheck.html"
      + auto_scaling_group p-e-web  (wave 2)
            desired = 2

    Plan: 4 to create, 0 to update, 0 to replace, 0 to delete, 0 unchanged.
    "#);
    assert_eq!(
        plan.waves().iter().map(Vec::len).collect::<Vec<_>>(),
        [1, 2, 1]
    );
}

#[test]
fn a_second_run_finds_nothing_to_do() {
    let topology = small_topology();
    let plan = plan(&observe(&topology), &topology);
    assert!(plan.is_empty());
    assert_eq!(plan.summary().no_op, 4);
    assert!(plan.waves().is_empty());
}

#[test]
fn drift_in_place_is_an_update_with_its_reason() {
    let topology = small_topology();
    let mut observed = observe(&topology);
    let group = observed
        .resources
        .get_mut(&id(ResourceKind::AutoScalingGroup, "p-e-web"))
        .unwrap();
    group.attributes.insert("desired".into(), Value::Integer(5));
    let plan = plan(&observed, &topology);
    let step = plan
        .steps
        .iter()
        .find(|s| s.action != Action::NoOp)
        .unwrap();
    assert_eq!(step.action, Action::Update);
    assert_eq!(
        step.changes,
        [Change {
            attribute: "desired".into(),
            old: Some(Value::Integer(5)),
            new: Some(Value::Integer(2)),
            forces_replacement: false
        }]
    );
    // Its dependencies did not change, so it waits for nothing.
    assert_eq!(step.wave, Some(0));
    assert!(step.depends_on.is_empty());
}

#[test]
fn a_rule_added_by_hand_shows_as_one_rule_removed() {
    let topology = small_topology();
    let mut observed = observe(&topology);
    let web_sg = observed
        .resources
        .get_mut(&id(ResourceKind::SecurityGroup, "p-e-web-sg"))
        .unwrap();
    web_sg.attributes.insert(
        "ingress".into(),
        Value::Set(BTreeSet::from([
            "tcp/80 from 0.0.0.0/0".to_owned(),
            "tcp/22 from 0.0.0.0/0".to_owned(),
        ])),
    );
    let plan = plan(&observed, &topology);
    insta::assert_snapshot!(render::human(&plan, Style::default()), @r#"
    Plan for p/e at release r1:

      ~ security_group p-e-web-sg
            ingress
              - "tcp/22 from 0.0.0.0/0"

    Plan: 0 to create, 1 to update, 0 to replace, 0 to delete, 3 unchanged.
    "#);
}

#[test]
fn an_immutable_change_forces_replacement() {
    let topology = small_topology();
    let mut observed = observe(&topology);
    let lb_sg = observed
        .resources
        .get_mut(&id(ResourceKind::SecurityGroup, "p-e-lb-sg"))
        .unwrap();
    lb_sg
        .attributes
        .insert("description".into(), Value::from("by hand"));
    let plan = plan(&observed, &topology);
    assert_eq!(plan.steps[0].action, Action::Replace);
    assert!(render(&plan).contains(r#"description   "by hand" -> "rigger"  (forces replacement)"#));
}

#[test]
fn a_different_release_tag_alone_changes_nothing() {
    let topology = small_topology();
    let mut observed = observe(&topology);
    for resource in observed.resources.values_mut() {
        resource.tags.insert("release".into(), "r0".into());
    }
    assert!(plan(&observed, &topology).is_empty());
}

#[test]
fn a_missing_tag_is_drift() {
    let topology = small_topology();
    let mut observed = observe(&topology);
    observed
        .resources
        .get_mut(&id(ResourceKind::SecurityGroup, "p-e-lb-sg"))
        .unwrap()
        .tags
        .remove("role");
    let plan = plan(&observed, &topology);
    let step = plan
        .steps
        .iter()
        .find(|s| s.action == Action::Update)
        .unwrap();
    assert_eq!(step.changes[0].attribute, "tags.role");
}

#[test]
fn deletions_remove_dependents_first() {
    let desired = Topology {
        resources: vec![],
        ..small_topology()
    };
    let plan = plan(&observe(&small_topology()), &desired);
    let order: Vec<(String, Option<usize>)> = plan
        .steps
        .iter()
        .map(|s| (s.id.name.clone(), s.wave))
        .collect();
    // The group goes first, then the load balancer and the web group, then the lb group.
    let wave_of = |name: &str| order.iter().find(|(n, _)| n == name).unwrap().1.unwrap();
    assert!(wave_of("p-e-web") < wave_of("p-e-lb"));
    assert!(wave_of("p-e-web") < wave_of("p-e-web-sg"));
    assert!(wave_of("p-e-lb") < wave_of("p-e-lb-sg"));
    assert!(wave_of("p-e-web-sg") < wave_of("p-e-lb-sg"));
    assert_eq!(plan.summary().delete, 4);
}

#[test]
fn json_is_versioned_and_lists_every_step() {
    let plan = plan(&Observed::empty(), &small_topology());
    let document: serde_json::Value = serde_json::from_str(&json::to_json(&plan)).unwrap();
    assert_eq!(document["schema"], "rigger.plan");
    assert_eq!(document["version"], 1);
    assert_eq!(document["summary"]["create"], 4);
    assert_eq!(document["steps"][3]["kind"], "auto_scaling_group");
    assert_eq!(
        document["steps"][3]["depends_on"],
        serde_json::json!([1, 2])
    );
    assert_eq!(document["steps"][3]["changes"][0]["new"], 2);
}
