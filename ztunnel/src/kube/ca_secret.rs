//! The built-in CA's root in a Kubernetes Secret, shared by every node's ztunnel.
//!
//! The first ztunnel to find it missing generates a root and creates the Secret; creation
//! never replaces an existing object, so when several start together exactly one create
//! succeeds and the others get 409 Conflict and read the winner's root. The Secret is
//! marked immutable: nothing ever updates it in place. Rotating the root means deleting it
//! and restarting every ztunnel.
use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use super::Error;
use crate::identity::{BuiltinCa, ROOT_CERT_FILE, ROOT_KEY_FILE};

/// Loads the root from `namespace/name`, which must exist ([`Error::SecretMissing`]).
pub async fn load(
    client: &Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<BuiltinCa, Error> {
    let secret = format!("{namespace}/{name}");
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(name)
        .await
        .map_err(|source| Error::Secret {
            action: "read",
            secret: secret.clone(),
            source,
        })?
        .ok_or_else(|| Error::SecretMissing {
            secret: secret.clone(),
        })?;
    root_of_secret(existing, secret, trust_domain, lifetime)
}

/// Loads the root from `namespace/name`, creating the Secret first if it does not exist.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<BuiltinCa, Error> {
    let secret = format!("{namespace}/{name}");
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let get = |api: Api<Secret>| {
        let secret = secret.clone();
        async move {
            api.get_opt(name).await.map_err(|source| Error::Secret {
                action: "read",
                secret,
                source,
            })
        }
    };
    let existing = match get(api.clone()).await? {
        Some(s) => s,
        None => {
            let (cert, key) =
                BuiltinCa::generate_root_pem(trust_domain).map_err(|source| Error::SecretRoot {
                    secret: secret.clone(),
                    source: Box::new(source),
                })?;
            let new = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".to_owned(),
                        "ztunnel".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_owned()),
                immutable: Some(true),
                data: Some(BTreeMap::from([
                    (ROOT_CERT_FILE.to_owned(), ByteString(cert.into_bytes())),
                    (ROOT_KEY_FILE.to_owned(), ByteString(key.into_bytes())),
                ])),
                ..Secret::default()
            };
            match api.create(&PostParams::default(), &new).await {
                Ok(created) => {
                    tracing::info!(secret, "created the built-in ca root secret");
                    created
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::info!(
                        secret,
                        "another ztunnel created the ca root secret first; using it"
                    );
                    get(api).await?.ok_or_else(|| Error::SecretKey {
                        secret: secret.clone(),
                        key: ROOT_CERT_FILE,
                    })?
                }
                Err(source) => {
                    return Err(Error::Secret {
                        action: "create",
                        secret,
                        source,
                    });
                }
            }
        }
    };
    root_of_secret(existing, secret, trust_domain, lifetime)
}

/// The CA of a root Secret's two entries.
fn root_of_secret(
    existing: Secret,
    secret: String,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<BuiltinCa, Error> {
    let data = existing.data.unwrap_or_default();
    let entry = |key: &'static str| {
        data.get(key)
            .map(|b| b.0.as_slice())
            .ok_or_else(|| Error::SecretKey {
                secret: secret.clone(),
                key,
            })
    };
    BuiltinCa::from_pem(
        &format!("secret {secret}"),
        entry(ROOT_CERT_FILE)?,
        entry(ROOT_KEY_FILE)?,
        trust_domain,
        lifetime,
    )
    .map_err(|source| Error::SecretRoot {
        secret,
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{API_ACCESS, fake_api::FakeApi};
    use super::*;
    use crate::identity::Identity;

    const DAY: Duration = Duration::from_secs(86_400);

    fn root_of(ca: &BuiltinCa) -> Vec<u8> {
        ca.root().to_vec()
    }

    #[tokio::test]
    async fn a_waypoint_reads_the_nodes_root_and_never_creates_one() {
        let api = FakeApi::start().await;
        let client = api.client();
        let err = load(
            &client,
            "istio-system",
            "ztunnel-ca-root",
            "cluster.local",
            DAY,
        )
        .await
        .err()
        .expect("no secret yet");
        assert!(
            matches!(err, Error::SecretMissing { ref secret } if secret == "istio-system/ztunnel-ca-root"),
            "{err}"
        );
        assert!(
            api.secret("istio-system/ztunnel-ca-root").is_none(),
            "created nothing"
        );
        let node = load_or_create(
            &client,
            "istio-system",
            "ztunnel-ca-root",
            "cluster.local",
            DAY,
        )
        .await
        .expect("a node creates it");
        let waypoint = load(
            &client,
            "istio-system",
            "ztunnel-ca-root",
            "cluster.local",
            DAY,
        )
        .await
        .expect("the waypoint reads it");
        assert_eq!(root_of(&node), root_of(&waypoint));
        assert!(
            api.calls().iter().filter(|c| c.verb == "create").count() == 1,
            "only the node created the secret"
        );
    }

    #[tokio::test]
    async fn first_ztunnel_creates_the_root_and_the_next_reuses_it() {
        let api = FakeApi::start().await;
        let client = api.client();
        let a = load_or_create(
            &client,
            "istio-system",
            "ztunnel-ca-root",
            "cluster.local",
            DAY,
        )
        .await
        .expect("creates the secret");
        let stored = api
            .secret("istio-system/ztunnel-ca-root")
            .expect("secret stored");
        assert_eq!(stored["immutable"], serde_json::json!(true));
        let b = load_or_create(
            &client,
            "istio-system",
            "ztunnel-ca-root",
            "cluster.local",
            DAY,
        )
        .await
        .expect("reads the secret");
        assert_eq!(root_of(&a), root_of(&b), "every node shares one root");
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .expect("identity");
        a.issue(&id).expect("the root issues leaves");
        api.assert_calls_granted(API_ACCESS);
    }

    #[tokio::test]
    async fn losing_the_create_race_reads_the_winners_root() {
        let api = FakeApi::start().await;
        let (cert, key) = BuiltinCa::generate_root_pem("cluster.local").expect("root");
        let b64 = |s: &str| {
            use k8s_openapi::ByteString;
            serde_json::to_value(ByteString(s.as_bytes().to_vec())).expect("base64")
        };
        api.race_secret_create(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": true,
            "metadata": {"name": "ztunnel-ca-root", "namespace": "istio-system", "resourceVersion": "1"},
            "data": {ROOT_CERT_FILE: b64(&cert), ROOT_KEY_FILE: b64(&key)}
        }));
        let ca = load_or_create(
            &api.client(),
            "istio-system",
            "ztunnel-ca-root",
            "cluster.local",
            DAY,
        )
        .await
        .expect("409 Conflict falls back to the winner's secret");
        let winner = BuiltinCa::from_pem(
            "winner",
            cert.as_bytes(),
            key.as_bytes(),
            "cluster.local",
            DAY,
        )
        .expect("winner's root");
        assert_eq!(
            root_of(&ca),
            root_of(&winner),
            "the winner's root, not ours"
        );
        let verbs: Vec<String> = api.calls().into_iter().map(|c| c.verb).collect();
        assert_eq!(verbs, ["get", "create", "get"]);
    }

    #[tokio::test]
    async fn a_secret_without_the_key_is_reported_by_name() {
        let api = FakeApi::start().await;
        api.race_secret_create(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "ztunnel-ca-root", "namespace": "istio-system"}, "data": {}
        }));
        let err = load_or_create(
            &api.client(),
            "istio-system",
            "ztunnel-ca-root",
            "cluster.local",
            DAY,
        )
        .await
        .err()
        .expect("an empty secret is refused")
        .to_string();
        assert!(
            err.contains("istio-system/ztunnel-ca-root") && err.contains("root-cert.pem"),
            "{err}"
        );
    }
}
