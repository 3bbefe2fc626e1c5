//! vmiscope's introspection engine: HVMI's callback layer on top of a small
//! hypervisor interface. This crate names no KVM type.

pub mod paging;
