//! The complete program of the README: a service defined, served over mutual
//! TLS with throwaway certificates, and called, on 127.0.0.1.
//!
//! ```sh
//! cargo run -p srpc --example quickstart
//! ```

use srpc::{service, Client, Server, Status};

/// A greeting service.
#[service]
pub trait Greeter {
    /// Says hello; an empty name fails the call.
    async fn hello(&self, name: String) -> Result<String, Status>;
}

struct Friendly;

impl Greeter for Friendly {
    async fn hello(&self, name: String) -> Result<String, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("a name, please"));
        }
        let who = srpc::context().and_then(|c| c.identity().map(|id| id.subject.clone()));
        Ok(format!(
            "hello, {name} (your certificate: {})",
            who.unwrap_or_default()
        ))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A throwaway CA with server and client certificates (rcgen). Use your
    // own CA's in production: srpc::tls::server_config(cert, key, ca).
    let certs = srpc::devcerts::generate()?;
    let server = Server::builder(certs.server_tls(true)?)
        .add_service(GreeterServer::new(Friendly))
        .build()?;
    let listener = Server::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });

    let greeter = GreeterClient::new(Client::connect(&addr, certs.client_tls(true)?).await?);
    println!("{}", greeter.hello("world".into()).await?);
    if let Err(refused) = greeter.hello(String::new()).await {
        println!("{refused}");
    }
    Ok(())
}
