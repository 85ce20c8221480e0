//! The AWS lab: the emulator's EC2 instances booted as real machines on this one, so the AWS
//! half of rigger runs for real without an AWS account (docs/lab.md).
//!
//! `rigger lab up` starts the emulator (moto) as the control plane and a runner
//! ([`runner`]) that makes every running instance a machine ([`machine`]): the lab image
//! ([`image`], Debian 12 built once with mmdebstrap and known to the emulator as an AMI)
//! under an overlay of the machine's own, booted with `systemd-nspawn`, in a network namespace
//! of its own holding exactly the instance's private address on a bridge that carries the
//! emulator's default VPC ([`net`]), answered by a per-machine instance metadata service
//! ([`imds`]). The image's stand-in for cloud-init installs the key pair's key for `admin` and
//! runs the user-data once. `rigger lab down` leaves nothing ([`control`]).
//!
//! Nothing the lab makes is connected to this machine's network: the bridge lives in a
//! namespace of the lab's own, machines have no default route, no namespace forwards. Start
//! reading at [`control::up`], then [`runner::run`].

pub mod balancer;
pub mod bastion;
pub mod control;
pub mod dns;
pub mod front;
pub mod image;
pub mod images;
pub mod imds;
pub mod layout;
pub mod machine;
pub mod net;
pub mod pki;
pub mod runner;
pub mod status;
pub mod sys;
pub mod volume;

pub use layout::Lab;
