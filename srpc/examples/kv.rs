//! A key-value store whose methods return typed errors: the server's
//! `Result<_, KvError>` arrives intact at the client, as data.
//!
//! ```sh
//! cargo run -p srpc --example kv
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use srpc::{service, Client, Server};

/// What can go wrong, as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// No value under that key.
    #[error("no value under {0:?}")]
    NotFound(String),
    /// The store holds `capacity` keys already.
    #[error("the store is full ({capacity} keys)")]
    Full {
        /// How many keys it holds at most.
        capacity: usize,
    },
}

/// A small key-value store.
#[service]
pub trait KeyValue {
    /// Stores `value` under `key`.
    async fn put(&self, key: String, value: String) -> Result<(), KvError>;
    /// The value under `key`.
    async fn get(&self, key: String) -> Result<String, KvError>;
    /// Removes `key`; returns whether it was there.
    async fn delete(&self, key: String) -> bool;
}

struct Store {
    map: Mutex<HashMap<String, String>>,
    capacity: usize,
}

impl KeyValue for Store {
    async fn put(&self, key: String, value: String) -> Result<(), KvError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&key) {
            return Err(KvError::Full {
                capacity: self.capacity,
            });
        }
        map.insert(key, value);
        Ok(())
    }

    async fn get(&self, key: String) -> Result<String, KvError> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key).cloned().ok_or(KvError::NotFound(key))
    }

    async fn delete(&self, key: String) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&key).is_some()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let certs = srpc::server::devcerts::generate()?;
    let store = Store {
        map: Mutex::new(HashMap::new()),
        capacity: 2,
    };
    let server = Server::builder(certs.server_tls(false)?)
        .add_service(KeyValueServer::new(store))
        .build()?;
    let listener = Server::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });

    let kv = KeyValueClient::new(Client::connect(&addr, certs.client_tls(false)?).await?);
    kv.put("a".into(), "1".into()).await??;
    kv.put("b".into(), "2".into()).await??;
    println!("a = {}", kv.get("a".into()).await??);
    // Typed errors come back as data: the call worked, the store said no.
    let missing = kv.get("zzz".into()).await?;
    println!("zzz: {missing:?}");
    anyhow::ensure!(missing == Err(KvError::NotFound("zzz".into())));
    let full = kv.put("c".into(), "3".into()).await?;
    println!("c: {full:?}");
    anyhow::ensure!(full == Err(KvError::Full { capacity: 2 }));
    println!("deleted a: {}", kv.delete("a".into()).await?);
    kv.put("c".into(), "3".into()).await??;
    println!("c = {}", kv.get("c".into()).await??);
    Ok(())
}
