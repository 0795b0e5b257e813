// Empty on purpose: the user-space crate has a build-dependency on this package so that cargo
// rebuilds it when the programs change; the programs themselves are the `portguard` binary.
#![no_std]
