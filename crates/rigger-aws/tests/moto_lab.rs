//! What the lab (`rigger-lab`) counts on from the emulator, through `rigger_aws::lab`, against
//! moto's server: a group's instance carries its group's tag and no instance profile, and the
//! lab finds the profile its launch template (a version of it) or launch configuration names,
//! by name or ARN; the launch template's (default version's) data volume is attached to the instance at launch;
//! reporting a dead instance to its group makes the group launch a replacement.

mod common;

use aws_sdk_autoscaling::types::LaunchTemplateSpecification;
use aws_sdk_ec2::types::{
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateIamInstanceProfileSpecificationRequest, RequestLaunchTemplateData,
};
use common::{AMI, Moto};
use rigger_aws::Clients;
use rigger_aws::lab;

async fn profile(clients: &Clients, name: &str) -> String {
    clients
        .iam
        .create_instance_profile()
        .instance_profile_name(name)
        .send()
        .await
        .expect("CreateInstanceProfile")
        .instance_profile()
        .unwrap()
        .arn()
        .to_owned()
}

async fn group_instances(clients: &Clients, group: &str) -> Vec<String> {
    let groups = clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .expect("DescribeAutoScalingGroups");
    groups.auto_scaling_groups()[0]
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_group_instance_gets_its_launch_templates_profile_volume_and_replacement() {
    let moto = Moto::start();
    let clients = Clients::connect(&moto.connection()).await;
    let first_arn = profile(&clients, "lab-first").await;
    let second_arn = profile(&clients, "lab-second").await;
    // Version 1 names its profile by name; version 2 by ARN, with a data volume.
    let data = |spec: LaunchTemplateIamInstanceProfileSpecificationRequest| {
        RequestLaunchTemplateData::builder()
            .image_id(AMI)
            .iam_instance_profile(spec)
    };
    let template = clients
        .ec2
        .create_launch_template()
        .launch_template_name("lab-template")
        .launch_template_data(
            data(
                LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                    .name("lab-first")
                    .build(),
            )
            .build(),
        )
        .send()
        .await
        .expect("CreateLaunchTemplate");
    let template_id = template
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap()
        .to_owned();
    clients
        .ec2
        .create_launch_template_version()
        .launch_template_id(&template_id)
        .launch_template_data(
            data(
                LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                    .arn(&second_arn)
                    .build(),
            )
            .block_device_mappings(
                LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name("/dev/sdf")
                    .ebs(
                        LaunchTemplateEbsBlockDeviceRequest::builder()
                            .volume_size(3)
                            .build(),
                    )
                    .build(),
            )
            .build(),
        )
        .send()
        .await
        .expect("CreateLaunchTemplateVersion");
    // As rigger does (it launches groups from `$Default`): moto launches a group's instances
    // from the template's default version, whatever version the group names.
    clients
        .ec2
        .modify_launch_template()
        .launch_template_id(&template_id)
        .default_version("2")
        .send()
        .await
        .expect("ModifyLaunchTemplate");
    for (group, version) in [("lab-v1", "1"), ("lab-default", "$Default")] {
        clients
            .autoscaling
            .create_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_id(&template_id)
                    .version(version)
                    .build(),
            )
            .min_size(1)
            .max_size(1)
            .desired_capacity(1)
            .availability_zones("us-east-1a")
            .send()
            .await
            .expect("CreateAutoScalingGroup");
    }

    // The emulator launches them without a profile; the lab finds the template version's.
    let instances = lab::instances(&clients).await.unwrap();
    let of_group = |group: &str| {
        instances
            .iter()
            .find(|i| i.autoscaling_group.as_deref() == Some(group))
            .unwrap_or_else(|| panic!("no instance of {group}: {instances:?}"))
            .clone()
    };
    let (v1, default_group) = (of_group("lab-v1"), of_group("lab-default"));
    assert_eq!(v1.instance_profile_arn, None);
    assert_eq!(default_group.instance_profile_arn, None);
    let named = lab::group_instance_profile(&clients, "lab-v1")
        .await
        .unwrap();
    assert_eq!(named.as_deref(), Some("lab-first"));
    let (arn, id) = lab::instance_profile(&clients, &named.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(arn, first_arn);
    assert!(!id.is_empty());
    let named = lab::group_instance_profile(&clients, "lab-default")
        .await
        .unwrap();
    assert_eq!(named.as_deref(), Some(second_arn.as_str()));
    let (arn, _) = lab::instance_profile(&clients, &second_arn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(arn, second_arn);
    assert_eq!(
        lab::group_instance_profile(&clients, "no-such-group")
            .await
            .unwrap(),
        None
    );

    // The launch template's volume is attached at launch, as the lab binds it at boot.
    let volumes = lab::volumes(&clients).await.unwrap();
    let data_volume = volumes
        .iter()
        .find(|v| {
            v.attachment
                .as_ref()
                .is_some_and(|(i, d)| i == &default_group.id && d == "/dev/sdf")
        })
        .unwrap_or_else(|| panic!("no /dev/sdf volume for {}: {volumes:?}", default_group.id));
    assert_eq!(data_volume.size_gib, 3);

    // Reported dead: the group launches a replacement, and keeps its size.
    lab::replace_in_group(&clients, &default_group.id)
        .await
        .unwrap();
    let now = group_instances(&clients, "lab-default").await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], default_group.id);
    let instances = lab::instances(&clients).await.unwrap();
    let dead = instances.iter().find(|i| i.id == default_group.id).unwrap();
    assert!(
        matches!(dead.state.as_str(), "shutting-down" | "terminated"),
        "{dead:?}"
    );
}
