//! Calls by schema (`Client::describe`, `call_json`, `call_json_stream`)
//! against a `#[service]` over TLS on 127.0.0.1: the server receives
//! exactly the typed values the JSON stands for (structs, enums, options,
//! vectors, maps, a user error enum), JSON that does not fit is refused
//! naming the field and never reaches the server, and methods whose types
//! do not trace are listed without a schema while still served.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use rpc_client::dynamic::DynamicError;
use rpc_client::{ClientError, StatusCode};
use rpc_core::streaming::{ServerStream, Streaming};
use rpc_core::{CallOptions, Status};
use rpc_server::{Router, ServerOptions};
use rpc_tests::TestServer;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    lines: Vec<Line>,
    note: Option<String>,
    tags: BTreeMap<String, u32>,
    by_code: HashMap<u16, String>,
    origin: (i8, char),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Line {
    item: Item,
    qty: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Item {
    Book { isbn: String },
    Pen(u8),
    Gift(Box<Item>),
    Nothing,
    Pair(i32, i64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ShopError {
    OutOfStock { item: String },
    Closed,
}

/// Refuses odd numbers: a validating `Deserialize`, which does not trace.
#[derive(Debug, Clone, Copy, Serialize)]
struct Even(u32);

impl<'de> Deserialize<'de> for Even {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        if n % 2 == 1 || n == 0 {
            return Err(serde::de::Error::custom("not a positive even number"));
        }
        Ok(Even(n))
    }
}

#[rpc_macros::service(crate = rpc_core)]
trait Shop {
    async fn place(&self, order: Order, urgent: bool) -> Result<u64, ShopError>;
    async fn check(&self, order: Order) -> Result<u32, Status>;
    async fn total(&self, prices: Vec<f64>, discount: Option<f32>) -> f64;
    async fn halve(&self, n: Even) -> u32;
    async fn lines(&self, order: Order) -> ServerStream<Line>;
    async fn count(&self, label: String, items: Streaming<Item>) -> (String, u32);
}

#[derive(Default)]
struct Shopkeeper {
    calls: AtomicUsize,
    received: Mutex<Vec<Order>>,
}

impl Shop for Arc<Shopkeeper> {
    async fn place(&self, order: Order, urgent: bool) -> Result<u64, ShopError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.received.lock().unwrap().push(order.clone());
        match order.lines.first().map(|l| &l.item) {
            Some(Item::Pen(_)) => Err(ShopError::OutOfStock { item: "pen".into() }),
            _ if urgent => Err(ShopError::Closed),
            _ => Ok(order.id * 10),
        }
    }

    async fn check(&self, order: Order) -> Result<u32, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if order.lines.is_empty() {
            return Err(Status::invalid_argument("an order needs lines"));
        }
        Ok(order.lines.len() as u32)
    }

    async fn total(&self, prices: Vec<f64>, discount: Option<f32>) -> f64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        prices.iter().sum::<f64>() - f64::from(discount.unwrap_or(0.0))
    }

    async fn halve(&self, n: Even) -> u32 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        n.0 / 2
    }

    async fn lines(&self, order: Order) -> ServerStream<Line> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        ServerStream::iter(order.lines)
    }

    async fn count(&self, label: String, mut items: Streaming<Item>) -> (String, u32) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut n = 0;
        while let Some(Ok(_)) = items.next().await {
            n += 1;
        }
        (label, n)
    }
}

async fn start() -> (TestServer, Arc<Shopkeeper>) {
    let keeper = Arc::new(Shopkeeper::default());
    let router = Router::new()
        .service(ShopServer::new(keeper.clone()))
        .route("plain", |n: u32| async move { Ok::<_, Status>(n + 1) });
    let server = TestServer::start(router, ServerOptions::default()).await;
    (server, keeper)
}

fn order_json() -> Value {
    json!({
        "id": 7,
        "lines": [
            {"item": {"Book": {"isbn": "978-0"}}, "qty": 2},
            {"item": {"Gift": {"Pair": [-1, 5000000000i64]}}, "qty": 65535},
            {"item": "Nothing", "qty": 1},
            {"item": {"Nothing": null}, "qty": 0}
        ],
        "note": null,
        "tags": {"red": 1, "blue": 2},
        "by_code": {"404": "missing", "7": "seven"},
        "origin": [-3, "x"]
    })
}

fn order() -> Order {
    Order {
        id: 7,
        lines: vec![
            Line {
                item: Item::Book {
                    isbn: "978-0".into(),
                },
                qty: 2,
            },
            Line {
                item: Item::Gift(Box::new(Item::Pair(-1, 5_000_000_000))),
                qty: 65535,
            },
            Line {
                item: Item::Nothing,
                qty: 1,
            },
            Line {
                item: Item::Nothing,
                qty: 0,
            },
        ],
        note: None,
        tags: [("red".into(), 1), ("blue".into(), 2)].into(),
        by_code: [(404, "missing".into()), (7, "seven".into())].into(),
        origin: (-3, 'x'),
    }
}

#[tokio::test]
async fn json_arguments_reach_the_server_as_the_typed_values_and_replies_come_back_as_json() {
    let (server, keeper) = start().await;
    let client = server.client().await;
    let listing = client.describe().await.unwrap();
    let opts = CallOptions::new();

    // By name, then by position: the server gets the same Order.
    let reply = client
        .call_json(
            &listing,
            "Shop.place",
            &json!({"order": order_json(), "urgent": false}),
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(reply, json!({"Ok": 70}));
    let mut with_note = order_json();
    with_note["note"] = json!("ring twice");
    let reply = client
        .call_json(&listing, "Shop.place", &json!([with_note, true]), &opts)
        .await
        .unwrap();
    // The user's error enum travels as data.
    assert_eq!(reply, json!({"Err": {"Closed": null}}));
    let received = keeper.received.lock().unwrap().clone();
    let mut expected_note = order();
    expected_note.note = Some("ring twice".into());
    assert_eq!(received, [order(), expected_note]);

    let mut pen = order_json();
    pen["lines"][0]["item"] = json!({"Pen": 3});
    let reply = client
        .call_json(
            &listing,
            "Shop.place",
            &json!({"order": pen, "urgent": false}),
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(reply, json!({"Err": {"OutOfStock": {"item": "pen"}}}));

    // Options and floats; a Status is a failed call, as for typed clients.
    let reply = client
        .call_json(
            &listing,
            "Shop.total",
            &json!({"prices": [1.5, 2.25], "discount": 0.5}),
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(reply, json!(3.25));
    let reply = client
        .call_json(
            &listing,
            "Shop.total",
            &json!({"prices": [], "discount": null}),
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(reply, json!(0.0));
    let mut empty = order_json();
    empty["lines"] = json!([]);
    let err = client
        .call_json(&listing, "Shop.check", &json!({"order": empty}), &opts)
        .await
        .unwrap_err();
    match err {
        DynamicError::Call(ClientError::Call(rpc_core::Error::Status(s))) => {
            assert_eq!(s.code, StatusCode::InvalidArgument);
        }
        other => panic!("expected the status, got {other:?}"),
    }
    assert_eq!(keeper.calls.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn json_that_does_not_fit_is_refused_naming_the_field_and_never_sent() {
    let (server, keeper) = start().await;
    let client = server.client().await;
    let listing = client.describe().await.unwrap();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"order": {"lines": []}, "urgent": true}),
            "order.id",
            "missing",
        ),
        (
            {
                let mut o = order_json();
                o["colour"] = json!("red");
                json!({"order": o, "urgent": true})
            },
            "order.colour",
            "no such field",
        ),
        (
            {
                let mut o = order_json();
                o["lines"][1]["qty"] = json!(65536);
                json!({"order": o, "urgent": true})
            },
            "order.lines[1].qty",
            "expected an integer in 0..=65535, got 65536",
        ),
        (
            {
                let mut o = order_json();
                o["lines"][0]["item"] = json!({"Sword": 1});
                json!({"order": o, "urgent": true})
            },
            "order.lines[0].item",
            "no variant \"Sword\"; the variants are Book, Pen, Gift, Nothing, Pair",
        ),
        (
            {
                let mut o = order_json();
                o["lines"][1]["item"] = json!({"Gift": {"Pair": [1]}});
                json!({"order": o, "urgent": true})
            },
            "order.lines[1].item.Gift.Pair",
            "expected an array of 2",
        ),
        (
            {
                let mut o = order_json();
                o["by_code"] = json!({"four": "x"});
                json!({"order": o, "urgent": true})
            },
            "order.by_code",
            "key \"four\" is not a u16",
        ),
        (
            {
                let mut o = order_json();
                o["origin"] = json!([1, "xy"]);
                json!({"order": o, "urgent": true})
            },
            "order.origin[1]",
            "expected a string of one character",
        ),
        (json!({"order": order_json()}), "urgent", "missing"),
        (
            json!({"order": order_json(), "urgent": true, "extra": 1}),
            "extra",
            "no such argument; the arguments are order, urgent",
        ),
        (json!([order_json()]), "arguments", "an array of 2"),
        (
            json!({"prices": "cheap", "discount": null}),
            "prices",
            "expected an array",
        ),
    ];
    for (args, field, problem) in cases {
        let method = if args.get("prices").is_some() {
            "Shop.total"
        } else {
            "Shop.place"
        };
        match client
            .call_json(&listing, method, &args, &CallOptions::new())
            .await
        {
            Err(DynamicError::Refused { mismatch, .. }) => {
                assert_eq!(mismatch.field, field, "{mismatch}");
                assert!(mismatch.problem.contains(problem), "{mismatch}");
            }
            other => panic!("{field}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        keeper.calls.load(Ordering::SeqCst),
        0,
        "a refused call reached the server"
    );
    // The connection is as good as before.
    let shop = ShopClient::new(client.clone());
    assert_eq!(shop.total(vec![1.0, 2.0], None).await.unwrap(), 3.0);
}

#[tokio::test]
async fn untraceable_methods_are_listed_without_a_schema_and_still_served() {
    let (server, keeper) = start().await;
    let client = server.client().await;
    let listing = client.describe().await.unwrap();
    let why = listing.schemas["Shop.halve"].as_ref().unwrap_err();
    assert!(why.contains("not a positive even number"), "{why}");
    let why = listing.schemas["plain"].as_ref().unwrap_err();
    assert!(why.contains("Router::route"), "{why}");
    for method in ["Shop.halve", "plain"] {
        let err = client
            .call_json(&listing, method, &json!([4]), &CallOptions::new())
            .await
            .unwrap_err();
        assert!(matches!(err, DynamicError::NoSchema { .. }), "{err:?}");
    }
    // The typed client calls it as ever.
    let shop = ShopClient::new(client.clone());
    assert_eq!(shop.halve(Even(8)).await.unwrap(), 4);
    assert_eq!(keeper.calls.load(Ordering::SeqCst), 1);
    // And the plain listing is what it was: the old clients' view.
    let plain = client.list().await.unwrap();
    assert_eq!(plain, listing.services);
}

#[tokio::test]
async fn stream_methods_take_and_give_items_as_json() {
    let (server, _keeper) = start().await;
    let client = server.client().await;
    let listing = client.describe().await.unwrap();
    let opts = CallOptions::new();
    let mut lines = client
        .call_json_stream(
            &listing,
            "Shop.lines",
            &json!({"order": order_json()}),
            &[],
            &opts,
        )
        .await
        .unwrap();
    let mut items = Vec::new();
    while let Some(item) = lines.next().await {
        items.push(item.unwrap());
    }
    assert_eq!(items.len(), 4);
    assert_eq!(
        items[0],
        json!({"item": {"Book": {"isbn": "978-0"}}, "qty": 2})
    );
    assert_eq!(items[2], json!({"item": {"Nothing": null}, "qty": 1}));
    assert_eq!(lines.reply().await.unwrap(), json!(null));

    let sent = [
        json!("Nothing"),
        json!({"Pen": 1}),
        json!({"Book": {"isbn": "1"}}),
    ];
    let mut count = client
        .call_json_stream(
            &listing,
            "Shop.count",
            &json!({"label": "box"}),
            &sent,
            &opts,
        )
        .await
        .unwrap();
    assert!(count.next().await.is_none());
    assert_eq!(count.reply().await.unwrap(), json!(["box", 3]));

    // An item that does not fit is refused before the stream opens.
    let bad = [json!("Nothing"), json!({"Pen": 300})];
    let err = client
        .call_json_stream(
            &listing,
            "Shop.count",
            &json!({"label": "box"}),
            &bad,
            &opts,
        )
        .await
        .unwrap_err();
    match err {
        DynamicError::Refused { mismatch, .. } => assert_eq!(mismatch.field, "item 1.Pen"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_listing_request_that_does_not_decode_fails_that_call_only() {
    let (server, _keeper) = start().await;
    let client = server.client().await;
    for body in [&[7u8][..], &[1, 2, 3][..]] {
        let err = client
            .call::<_, rpc_core::codec::Undecoded>(
                rpc_core::service::LIST_METHOD,
                &rpc_core::codec::Encoded(bytes::Bytes::copy_from_slice(body)),
            )
            .await
            .unwrap_err();
        match err {
            ClientError::Call(rpc_core::Error::Status(s)) => {
                assert_eq!(s.code, StatusCode::InvalidArgument, "{s}")
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
    // Asked properly, on the same connection.
    let listing = client.describe().await.unwrap();
    assert!(listing.schemas["Shop.place"].is_ok());
}

/// A server from before schemas: `srpc.list` ignores its body and answers
/// the plain listing (here an rpc-core connection with a dispatch of its
/// own, as the server then did).
struct OldServer;

impl rpc_core::Dispatch for OldServer {
    fn dispatch(
        &self,
        ctx: rpc_core::CallContext,
        _body: bytes::Bytes,
    ) -> rpc_core::BoxFuture<Result<bytes::Bytes, Status>> {
        let reply = match ctx.method() {
            rpc_core::service::LIST_METHOD => {
                let services = vec![rpc_core::service::ServiceDescription {
                    name: "Old".into(),
                    methods: vec![rpc_core::service::MethodDescription {
                        name: "ping".into(),
                        args: vec![],
                        returns: "()".into(),
                    }],
                }];
                Ok(rpc_core::codec::encode(&services, usize::MAX).unwrap())
            }
            m => Err(Status::unknown_method(m)),
        };
        Box::pin(async move { reply })
    }
}

#[tokio::test]
async fn a_server_from_before_schemas_lists_its_methods_without_them() {
    let certs = rpc_server::devcerts::generate().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(rpc_tests::server_tls(&certs));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let config = rpc_core::ConnectionConfig::default();
        let (_conn, driver) =
            rpc_core::transport::accept(tcp, &acceptor, &config, Arc::new(OldServer))
                .await
                .unwrap();
        // Serves until the client goes.
        driver.await
    });
    let client = rpc_client::Client::connect(&addr, rpc_tests::client_tls(&certs))
        .await
        .unwrap();
    let listing = client.describe().await.unwrap();
    assert_eq!(listing.services[0].name, "Old");
    let why = listing.schemas["Old.ping"].as_ref().unwrap_err();
    assert!(why.contains("predates method schemas"), "{why}");
    let err = client
        .call_json(&listing, "Old.ping", &json!(null), &CallOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, DynamicError::NoSchema { .. }), "{err:?}");
}
