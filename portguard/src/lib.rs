//! portguard as a library: what the `portguard` binary runs, exposed so that the fuzz targets
//! (`fuzz/`) can drive the policy parser and the control-socket request decoder directly.

pub mod check;
pub mod cli;
pub mod daemon;
pub mod doctor;
pub mod events;
pub mod policy;
pub mod policy_file;
pub mod protocol;
pub mod reload;
pub mod status;
pub mod uninstall;

mod cgroup;
mod cgroup_watch;
mod client;
mod control;
mod event_log;
mod live_state;
mod loader;
mod pins;
mod privileges;
mod reserved_ports;
mod scope_cgroups;
mod service_manager;
