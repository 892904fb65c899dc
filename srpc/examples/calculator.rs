//! A calculator service, served and called in one program on 127.0.0.1.
//!
//! ```sh
//! cargo run -p srpc --example calculator
//! ```

use srpc::{service, Client, Server, Status};

/// Arithmetic over the network.
#[service]
pub trait Calculator {
    /// `a + b`.
    async fn add(&self, a: i64, b: i64) -> i64;
    /// `a / b`; dividing by zero fails the call with `InvalidArgument`.
    async fn divide(&self, a: i64, b: i64) -> Result<i64, Status>;
    /// Who is asking: the caller's address, from the call context.
    async fn caller(&self) -> String;
}

struct Calc;

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }

    async fn divide(&self, a: i64, b: i64) -> Result<i64, Status> {
        a.checked_div(b)
            .ok_or_else(|| Status::invalid_argument(format!("{a} / {b} has no answer")))
    }

    async fn caller(&self) -> String {
        srpc::context().map_or_else(|| "unknown".into(), |ctx| ctx.peer().to_string())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let certs = srpc::server::devcerts::generate()?;
    let server = Server::builder(certs.server_tls(false)?)
        .add_service(CalculatorServer::new(Calc))
        .build()?;
    let listener = Server::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        server
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await
    });

    let calc = CalculatorClient::new(Client::connect(&addr, certs.client_tls(false)?).await?);
    println!("2 + 3 = {}", calc.add(2, 3).await?);
    println!("84 / 2 = {}", calc.divide(84, 2).await?);
    match calc.divide(1, 0).await {
        Ok(q) => anyhow::bail!("1 / 0 gave {q}"),
        Err(e) => println!("1 / 0 fails as it should: {e}"),
    }
    println!("the server sees us as {}", calc.caller().await?);
    for service in calc.as_caller().list().await? {
        for m in service.methods {
            println!("offered: {}.{} -> {}", service.name, m.name, m.returns);
        }
    }

    let _ = stop.send(());
    serving.await??;
    Ok(())
}
