//! Istio's control-plane interfaces: workloads, services and policies from istiod over
//! delta xDS ([`xds`]), workload certificates from Istio's CA ([`ca_client`]), and pods'
//! network namespaces from istio-cni over ZDS ([`zds`]). Each feeds the same store,
//! enrolment and certificate seams as the local workload file and the built-in CA.
pub mod proto;
