//! Workspace networks, through the libpod API.
//!
//! The Docker-compatible `POST /networks/create` of Podman 4.3 always turns DNS on (an
//! option like `dns_enabled=false` is ignored with a warning), and aardvark-dns forwards
//! outside names to the host's resolver even on an internal network. Only libpod's create
//! takes `dns_enabled`, so all network operations use libpod.
//!
//! Podman publishes no ports of containers on an internal network (the mapping is accepted
//! but nothing answers on the host port).

use conductor_core::engine::{EngineError, EngineResult, NetworkSpec, NetworkSummary};
use hyper::Method;
use serde::Deserialize;
use serde_json::json;

use crate::containers::label_filters;
use crate::error::api_error;
use crate::libpod::{encode_query_value, Libpod};

/// The parts of libpod's network description we read.
#[derive(Debug, Deserialize)]
struct LibpodNetwork {
    name: String,
    #[serde(default)]
    subnets: Option<Vec<LibpodSubnet>>,
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct LibpodSubnet {
    subnet: String,
}

/// One entry of libpod's removal report.
#[derive(Debug, Deserialize)]
struct RemoveReport {
    #[serde(rename = "Err")]
    err: Option<String>,
}

/// The libpod create request for `spec`.
fn create_request(spec: &NetworkSpec) -> serde_json::Value {
    let mut request = json!({
        "name": spec.name,
        "driver": spec.driver,
        "internal": spec.internal,
        "dns_enabled": spec.dns,
        "labels": spec.labels,
    });
    if let Some(subnet) = &spec.subnet {
        request["subnets"] = json!([{ "subnet": subnet }]);
    }
    if let Some(mtu) = spec.mtu {
        request["options"] = json!({ "mtu": mtu.to_string() });
    }
    request
}

pub(crate) async fn create(libpod: &Libpod, spec: &NetworkSpec) -> EngineResult<()> {
    let op = format!("create network '{}'", spec.name);
    libpod
        .call::<serde_json::Value>(Method::POST, "/networks/create", Some(&create_request(spec)))
        .await
        .map(|_| ())
        .map_err(|e| api_error(op, None, e))
}

/// Removes the network with libpod's `force`, which also removes containers still attached
/// (without it the removal fails while any exists); a missing network is not an error.
pub(crate) async fn remove(libpod: &Libpod, name: &str) -> EngineResult<()> {
    let op = format!("remove network '{name}'");
    let path = format!("/networks/{}?force=true", encode_query_value(name));
    let reports = match libpod.call::<Vec<RemoveReport>>(Method::DELETE, &path, None).await {
        Ok(reports) => reports,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(api_error(op, None, e)),
    };
    match reports.into_iter().find_map(|report| report.err) {
        Some(err) => Err(EngineError::failed(op, err)),
        None => Ok(()),
    }
}

pub(crate) async fn list(libpod: &Libpod, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<NetworkSummary>> {
    let filters = label_filters(labels);
    let query = json!({ "label": filters }).to_string();
    let path = format!("/networks/json?filters={}", encode_query_value(&query));
    let networks = libpod
        .call::<Vec<LibpodNetwork>>(Method::GET, &path, None)
        .await
        .map_err(|e| api_error(format!("list networks with labels {filters:?}"), None, e))?;
    Ok(networks
        .into_iter()
        .map(|network| NetworkSummary {
            name: network.name,
            subnets: network
                .subnets
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.subnet)
                .collect(),
            labels: network.labels.unwrap_or_default(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use conductor_core::engine::Labels;

    use super::*;

    #[test]
    fn the_create_request_disables_dns_and_sets_subnet_and_mtu() {
        let spec = NetworkSpec {
            name: "ws-net".into(),
            internal: true,
            dns: false,
            subnet: Some("10.89.3.0/28".into()),
            mtu: Some(1400),
            driver: "bridge".into(),
            labels: Labels::from([("io.conductor.ws".into(), "3".into())]),
        };
        assert_eq!(
            create_request(&spec),
            json!({
                "name": "ws-net", "driver": "bridge", "internal": true, "dns_enabled": false,
                "labels": {"io.conductor.ws": "3"},
                "subnets": [{"subnet": "10.89.3.0/28"}], "options": {"mtu": "1400"},
            })
        );
        let plain = NetworkSpec {
            subnet: None,
            mtu: None,
            ..spec
        };
        assert!(create_request(&plain).get("subnets").is_none());
        assert!(create_request(&plain).get("options").is_none());
    }
}
