//! `describe` and `call SERVICE.METHOD JSON`: any method of any server,
//! through the schemas it lists (the library's `dynamic` module).

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Context};
use rpc_client::dynamic::{self, render};
use rpc_client::Client;
use rpc_core::codec::DEFAULT_MAX_DEPTH;
use rpc_core::service::ServiceDescription;
use rpc_core::CallOptions;
use serde_json::Value;

/// Prints each method as `Service.method(arg: Type, ..) -> Reply`, then
/// the named types it uses, indented, or why it has no schema. With
/// `json`, one JSON object instead: each method's schema as
/// serde-reflection writes it (`{"error": why}` for one without), for
/// tools such as serde-generate.
pub(crate) async fn describe(client: &Client, only: &str, json: bool) -> anyhow::Result<()> {
    let listing = client.describe().await?;
    let (service, method) = only.split_once('.').unwrap_or((only, ""));
    let services: Vec<&ServiceDescription> = listing
        .services
        .iter()
        .filter(|s| only.is_empty() || s.name == service)
        .collect();
    if services.is_empty() {
        let names: Vec<&str> = listing.services.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "no service {service:?} on the server; it has {}",
            names.join(", ")
        );
    }
    let mut shown = 0;
    let mut schemas = serde_json::Map::new();
    for s in services {
        for m in s
            .methods
            .iter()
            .filter(|m| method.is_empty() || m.name == method)
        {
            shown += 1;
            let dot = if s.name.is_empty() { "" } else { "." };
            let wire = format!("{}{dot}{}", s.name, m.name);
            let schema = listing
                .schema(&wire, DEFAULT_MAX_DEPTH)
                .unwrap_or_else(|| Err("not listed".into()));
            if json {
                let value = match &schema {
                    Ok(schema) => serde_json::to_value(schema)?,
                    Err(why) => serde_json::json!({ "error": why }),
                };
                schemas.insert(wire, value);
                continue;
            }
            let args: Vec<String> = m.args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
            println!(
                "{}{dot}{}({}) -> {}",
                s.name,
                m.name,
                args.join(", "),
                m.returns
            );
            match schema {
                Ok(schema) => {
                    for definition in render::definitions(&schema) {
                        println!("    {definition}");
                    }
                }
                Err(why) => println!("    no schema ({why}): `call` cannot encode it"),
            }
        }
    }
    if shown == 0 {
        bail!("no method {only:?} on the server");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&schemas)?);
    }
    Ok(())
}

/// `call SERVICE.METHOD [JSON | @FILE]`: the arguments as JSON (an object
/// by argument name, or an array); prints the reply as one line of JSON. A
/// method returning a stream prints one line per item instead; one taking
/// a stream reads its items from stdin, one JSON value per line.
pub(crate) async fn call(client: &Client, words: Vec<String>) -> anyhow::Result<()> {
    let mut words = words.into_iter();
    let method = words.next().unwrap_or_default();
    let json = words.next();
    if let Some(extra) = words.next() {
        bail!("unexpected {extra:?}: the arguments are one JSON value (quote it)");
    }
    if !method.contains('.') {
        bail!(
            "no demo call {method:?} (those are echo, add, sleep, whoami, metadata); \
             call any method as SERVICE.METHOD 'JSON' (see `rpc-client describe`)"
        );
    }
    // `@FILE`: the arguments are in that file (large ones, or ones a
    // shell would mangle); stdin stays for a stream's items.
    let text = match json.as_deref().map(|t| (t, t.strip_prefix('@'))) {
        None => None,
        Some((_, Some(path))) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the arguments of {method} from {path:?}"))?,
        ),
        Some((text, None)) => Some(text.to_owned()),
    };
    let args: Value = match text {
        None => Value::Null,
        Some(text) => serde_json::from_str(&text)
            .with_context(|| format!("the arguments of {method} are not JSON"))?,
    };
    let listing = client.describe().await?;
    let (takes_items, sends_items) = {
        let schema = dynamic::schema(&listing, &method, DEFAULT_MAX_DEPTH)?;
        (schema.items_in.is_some(), schema.items_out.is_some())
    };
    if !takes_items && !sends_items {
        let reply = client
            .call_json(&listing, &method, &args, &CallOptions::new())
            .await?;
        println!("{reply}");
        return Ok(());
    }
    let items = if takes_items {
        read_items()?
    } else {
        Vec::new()
    };
    let mut stream = client
        .call_json_stream(&listing, &method, &args, &items, &CallOptions::new())
        .await?;
    while let Some(item) = stream.next().await {
        println!("{}", item?);
    }
    let reply = stream.reply().await?;
    if !sends_items {
        println!("{reply}");
    }
    Ok(())
}

/// The caller's stream items: stdin, one JSON value per line (blank lines
/// skipped).
fn read_items() -> anyhow::Result<Vec<Value>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("rpc-client: reading items from stdin, one JSON value per line; end with Ctrl-D");
    }
    let mut items = Vec::new();
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading items from stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(&line)
            .with_context(|| format!("item on line {} of stdin is not JSON", i + 1))?;
        items.push(item);
    }
    Ok(items)
}
