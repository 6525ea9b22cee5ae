//! Parsing what was rendered gives back the same manifests.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use cairn_schema::model::{Health, Placement, Source};
use cairn_schema::{
    App, ByteSize, Ciphertext, Cpu, EnvValue, ManifestFile, Name, Node, Plan, Price, Runtime, Span,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

fn ciphertext() -> Ciphertext {
    static CT: OnceLock<Ciphertext> = OnceLock::new();
    CT.get_or_init(|| {
        let id = cairn_schema::Identity::generate();
        cairn_schema::secret::encrypt(b"value", &[id.recipient()]).unwrap()
    })
    .clone()
}

fn name() -> impl Strategy<Value = Name> {
    "[a-z]([a-z0-9-]{0,10}[a-z0-9])?".prop_map(|s| Name::new(&s).unwrap())
}

fn size() -> impl Strategy<Value = ByteSize> {
    (1u64..1 << 20, 0usize..4).prop_map(|(n, u)| ByteSize(n << (10 * u)))
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        1u32..64_000,
        size(),
        size(),
        0i64..1_000_000,
        0u32..5,
        1u32..10,
    )
        .prop_map(|(cpu, memory, disk, amount, scale, max)| Plan {
            cpu: Cpu::from_millis(cpu),
            memory,
            disk,
            price: Price::new(Decimal::new(amount, scale)).unwrap(),
            max_replicas: max,
        })
}

fn runtime() -> impl Strategy<Value = Runtime> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec("\\PC{0,20}", 0..3),
        1u16..,
    )
        .prop_map(|(dockerfile, process, build, port)| {
            use cairn_schema::Driver::*;
            if dockerfile {
                Runtime {
                    drivers: vec![Docker],
                    dockerfile,
                    image: None,
                    build,
                    start: None,
                    port,
                }
            } else {
                Runtime {
                    drivers: if process {
                        vec![Docker, Process]
                    } else {
                        vec![Docker]
                    },
                    dockerfile,
                    image: Some("node:22".into()),
                    build,
                    start: Some("node server.js".into()),
                    port,
                }
            }
        })
}

fn labels() -> impl Strategy<Value = BTreeMap<Name, String>> {
    prop::collection::btree_map(name(), "\\PC{0,8}", 0..3)
}

fn node() -> impl Strategy<Value = Node> {
    (
        1u32..64_000,
        size(),
        size(),
        prop::option::of(name()),
        labels(),
        any::<bool>(),
        prop::option::of((any::<[u8; 3]>(), prop::option::of(1u16..))),
        any::<bool>(),
    )
        .prop_map(
            |(cpu, memory, disk, region, labels, drain, address, ingress)| Node {
                cpu: Cpu::from_millis(cpu),
                memory,
                disk,
                region,
                labels,
                drain,
                recipient: None,
                address: address.map(|([b, c, d], port)| {
                    let host = format!("10.{b}.{c}.{d}");
                    let text = port.map_or(host.clone(), |p| format!("{host}:{p}"));
                    cairn_schema::NodeAddress::new(&text).unwrap()
                }),
                ingress,
            },
        )
}

fn env() -> impl Strategy<Value = BTreeMap<cairn_schema::EnvName, EnvValue>> {
    prop::collection::btree_map(
        "[A-Z_][A-Z0-9_]{0,8}".prop_map(|s| cairn_schema::EnvName::new(&s).unwrap()),
        prop_oneof![
            "\\PC{0,16}".prop_map(EnvValue::Plain),
            Just(()).prop_map(|_| EnvValue::Secret {
                secret: ciphertext()
            }),
        ],
        0..4,
    )
}

#[allow(clippy::type_complexity)]
fn manifest() -> impl Strategy<Value = ManifestFile> {
    (
        prop::collection::btree_map(name(), plan(), 1..4),
        prop::collection::btree_map(name(), runtime(), 1..3),
        prop::collection::btree_map(name(), node(), 0..3),
        prop::collection::vec(
            (
                name(),
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                0u32..10,
                any::<bool>(),
                env(),
                1u64..86_400_000,
                prop::option::of(1u16..),
                prop::option::of("[a-z0-9.]{1,12}"),
            ),
            0..5,
        ),
    )
        .prop_map(|(plan, runtime, node, apps)| {
            let plans: Vec<&Name> = plan.keys().collect();
            let runtimes: Vec<&Name> = runtime.keys().collect();
            let mut app = BTreeMap::new();
            for (n, pi, ri, replicas, suspended, env, ms, port, rev) in apps {
                let p = pi.get(&plans);
                let max = plan[*p].max_replicas;
                app.insert(
                    n.clone(),
                    App {
                        plan: (*p).clone(),
                        runtime: ri.get(&runtimes).to_owned().clone(),
                        source: Source {
                            url: "git@github.com:acme/web.git".parse_url(),
                            branch: "release/1".into(),
                            rev: rev.filter(|r| cairn_schema::source::check_ref_name(r).is_ok()),
                        },
                        replicas: replicas % (max + 1),
                        port,
                        domains: vec![format!("{n}.example.org").parse_domain()],
                        health: Health {
                            path: "/healthz".into(),
                            timeout: Span(Duration::from_millis(ms)),
                        },
                        placement: Placement {
                            region: Some(n.clone()),
                            labels: BTreeMap::new(),
                        },
                        http: cairn_schema::Http {
                            max_body: port
                                .map(|p| cairn_schema::units::ByteSize(u64::from(p) << 20)),
                        },
                        databases: [("db", "CAIRN_DB_URL")]
                            .into_iter()
                            .filter(|(_, v)| !env.keys().any(|k| k.as_str() == *v))
                            .map(|(k, v)| (Name::new(k).unwrap(), v.parse().unwrap()))
                            .collect(),
                        suspended,
                        env,
                        tls: None,
                    },
                );
            }
            let database = plans
                .first()
                .map(|p| {
                    let db = cairn_schema::Database {
                        engine: cairn_schema::database::Engine::Postgres,
                        version: "15".into(),
                        plan: (*p).clone(),
                        node: None,
                        backup: Some(cairn_schema::DatabaseBackup {
                            schedule: "*/30 1-5 * * 1,3".parse().unwrap(),
                            keep: 3,
                            to: "dir:/var/backups/cairn".parse().unwrap(),
                            endpoint: None,
                            region: None,
                            access_key_id: None,
                            secret_access_key: None,
                        }),
                        verify: cairn_schema::model::default_verify(),
                    };
                    (Name::new("db").unwrap(), db)
                })
                .into_iter()
                .collect();
            ManifestFile {
                plan,
                runtime,
                node,
                app,
                notify: Default::default(),
                database,
            }
        })
}

trait ParseHelp {
    fn parse_url(&self) -> cairn_schema::GitUrl;
    fn parse_domain(&self) -> cairn_schema::Domain;
}
impl ParseHelp for str {
    fn parse_url(&self) -> cairn_schema::GitUrl {
        cairn_schema::GitUrl::new(self).unwrap()
    }
    fn parse_domain(&self) -> cairn_schema::Domain {
        cairn_schema::Domain::new(self).unwrap()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn rendered_manifests_parse_back_to_themselves(m in manifest()) {
        let text = toml::to_string(&m).expect("renders");
        let (_, loaded) = cairn_schema::load([
            ("all.toml", text.as_str()),
            ("cairn.toml", "base_domain = \"apps.example.com\""),
        ]);
        prop_assert!(!loaded.diagnostics.has_errors(), "{}\n---\n{}", loaded.diagnostics, text);
        let d = loaded.desired.expect("valid");
        prop_assert_eq!(d.to_manifest(), m);
    }
}
