//! Services declared with `#[service]`, over real TLS on 127.0.0.1: typed
//! clients, several services on one port and one connection, typed errors as
//! data, the listing, wrong shapes of arguments, and the call context.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Mutex;

use rpc_client::StatusCode;
use rpc_server::demo::DemoClient;
use rpc_server::ServerOptions;
use rpc_tests::TestServer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum KvError {
    NotFound(String),
    Full { capacity: usize },
}

/// A second service for the same port.
#[rpc_macros::service(crate = rpc_core)]
trait KeyValue {
    async fn put(&self, key: String, value: String) -> Result<(), KvError>;
    async fn get(&self, key: String) -> Result<String, KvError>;
    /// The caller's address, from the call context.
    async fn caller(&self) -> String;
}

struct Store {
    map: Mutex<HashMap<String, String>>,
    capacity: usize,
}

impl KeyValue for Store {
    async fn put(&self, key: String, value: String) -> Result<(), KvError> {
        let mut map = self.map.lock().unwrap();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            return Err(KvError::Full {
                capacity: self.capacity,
            });
        }
        map.insert(key, value);
        Ok(())
    }

    async fn get(&self, key: String) -> Result<String, KvError> {
        self.map
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or(KvError::NotFound(key))
    }

    async fn caller(&self) -> String {
        rpc_core::service::context()
            .expect("inside a call")
            .peer()
            .to_string()
    }
}

async fn two_services() -> TestServer {
    let store = Store {
        map: Mutex::new(HashMap::new()),
        capacity: 2,
    };
    let router = rpc_server::demo::router().service(KeyValueServer::new(store));
    TestServer::start(router, ServerOptions::default()).await
}

#[tokio::test]
async fn the_generated_client_is_typed() {
    let server = TestServer::demo().await;
    let demo = DemoClient::new(server.client().await);
    assert_eq!(demo.add(2, 3).await.unwrap(), 5);
    assert_eq!(demo.echo("typed".into()).await.unwrap(), "typed");
    demo.sleep(1).await.unwrap();
    // Result<T, Status> fails as a call with that status.
    let err = demo.add(i64::MAX, 1).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::InvalidArgument), "{err}");
    assert_eq!(demo.whoami().await.unwrap(), "anonymous");
}

#[tokio::test]
async fn two_services_share_one_port_and_one_connection_and_typed_errors_are_data() {
    let server = two_services().await;
    let client = server.client().await;
    let demo = DemoClient::new(client.clone());
    let kv = KeyValueClient::new(client.clone());
    kv.put("a".into(), "1".into()).await.unwrap().unwrap();
    assert_eq!(kv.get("a".into()).await.unwrap(), Ok("1".to_string()));
    assert_eq!(demo.add(40, 2).await.unwrap(), 42);
    assert_eq!(
        kv.get("zz".into()).await.unwrap(),
        Err(KvError::NotFound("zz".into()))
    );
    kv.put("b".into(), "2".into()).await.unwrap().unwrap();
    assert_eq!(
        kv.put("c".into(), "3".into()).await.unwrap(),
        Err(KvError::Full { capacity: 2 })
    );
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert!(kv.caller().await.unwrap().starts_with("127.0.0.1:"));
}

#[tokio::test]
async fn the_server_lists_services_methods_and_types() {
    let server = two_services().await;
    let listing = server.client().await.list().await.unwrap();
    let find = |name: &str| listing.iter().find(|s| s.name == name).unwrap();
    let demo = find("Demo");
    let add = demo.methods.iter().find(|m| m.name == "add").unwrap();
    assert_eq!(
        add.args,
        vec![
            ("a".to_string(), "i64".to_string()),
            ("b".to_string(), "i64".to_string())
        ]
    );
    assert_eq!(add.returns, "i64");
    let kv = find("KeyValue");
    let get = kv.methods.iter().find(|m| m.name == "get").unwrap();
    assert_eq!(get.returns, "Result<String,KvError>");
    assert_eq!(kv.methods.len(), 3);
}

#[tokio::test]
async fn wrong_shapes_and_unknown_methods_name_the_method_and_keep_the_connection() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    // An "older trait version": add took one string.
    let err = client
        .call::<_, i64>("Demo.add", &("two".to_string(),))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("Demo.add"), "{err}");
    // A "newer trait version": a method this server does not have.
    let err = client
        .call::<_, i64>("Demo.multiply", &(2i64, 3i64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::UnknownMethod), "{err}");
    assert!(err.to_string().contains("Demo.multiply"), "{err}");
    let demo = DemoClient::new(client);
    assert_eq!(demo.add(1, 1).await.unwrap(), 2);
}

#[tokio::test]
async fn adding_a_service_twice_makes_build_fail_naming_the_method() {
    let certs = rpc_server::devcerts::generate().unwrap();
    let store = || Store {
        map: Mutex::new(HashMap::new()),
        capacity: 1,
    };
    let err = rpc_server::Server::builder(rpc_tests::server_tls(&certs))
        .add_service(KeyValueServer::new(store()))
        .add_service(KeyValueServer::new(store()))
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("cannot serve these methods: "), "{text}");
    assert!(
        text.contains("method \"KeyValue.put\" is registered twice"),
        "{text}"
    );
    // A reserved name is refused the same way.
    let err = rpc_server::Server::builder(rpc_tests::server_tls(&certs))
        .router(rpc_server::Router::new().route("srpc.mine", |x: i64| async move { Ok(x) }))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("are reserved"), "{err}");
}

/// An application type that is merely named `Status`.
mod order {
    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub(crate) enum Status {
        Open,
        Shipped { parcels: u32 },
    }
}

#[rpc_macros::service(crate = rpc_core)]
trait Orders {
    async fn check(&self, id: u32) -> Result<u32, order::Status>;
}

struct OrderBook;

impl Orders for OrderBook {
    async fn check(&self, id: u32) -> Result<u32, order::Status> {
        match id {
            0 => Ok(7),
            1 => Err(order::Status::Open),
            _ => Err(order::Status::Shipped { parcels: id }),
        }
    }
}

#[tokio::test]
async fn an_application_type_named_status_travels_as_data() {
    let router = rpc_server::demo::router().service(OrdersServer::new(OrderBook));
    let server = TestServer::start(router, ServerOptions::default()).await;
    let orders = OrdersClient::new(server.client().await);
    // The client method returns the whole Result as data, inside its own.
    let got: Result<u32, order::Status> = orders.check(3).await.unwrap();
    assert_eq!(got, Err(order::Status::Shipped { parcels: 3 }));
    assert_eq!(orders.check(1).await.unwrap(), Err(order::Status::Open));
    assert_eq!(orders.check(0).await.unwrap(), Ok(7));
}
