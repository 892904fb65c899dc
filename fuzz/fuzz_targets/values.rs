//! Arbitrary bytes decoded as a user's nested type under the depth limit,
//! as a server decodes arguments and a client replies: an error or a
//! value, never a panic or a stack overflow, and a value nests no deeper
//! than the limit allowed.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rpc_core::codec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Node {
    Leaf(i64),
    Text(String),
    Neg(Box<Node>),
    List(Vec<Node>),
    Map(BTreeMap<String, Node>),
    Maybe(Option<Box<Node>>),
    Pair(Box<(Node, Node)>),
    Record { name: String, child: Option<Box<Node>> },
    Wrapped(Wrapper),
}

#[derive(Debug, Serialize, Deserialize)]
struct Wrapper(Vec<Node>);

/// The levels `node` spans, counted as the limit counts them (iterative,
/// so a deep value cannot overflow the checker either).
fn levels(node: &Node) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(node, 1usize)];
    while let Some((n, d)) = stack.pop() {
        deepest = deepest.max(d);
        match n {
            Node::Leaf(_) | Node::Text(_) => {}
            Node::Neg(c) => stack.push((c, d + 1)),
            Node::List(v) => stack.extend(v.iter().map(|c| (c, d + 2))),
            Node::Wrapped(w) => stack.extend(w.0.iter().map(|c| (c, d + 3))),
            Node::Map(m) => stack.extend(m.values().map(|c| (c, d + 2))),
            Node::Maybe(c) => stack.extend(c.iter().map(|c| (&**c, d + 2))),
            Node::Pair(p) => stack.extend([(&p.0, d + 2), (&p.1, d + 2)]),
            Node::Record { child, .. } => stack.extend(child.iter().map(|c| (&**c, d + 3))),
        }
    }
    deepest
}

/// Takes a value apart without recursion.
fn drop_flat(node: Node) {
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        match n {
            Node::Neg(c) => stack.push(*c),
            Node::List(v) => stack.extend(v),
            Node::Wrapped(w) => stack.extend(w.0),
            Node::Map(m) => stack.extend(m.into_values()),
            Node::Maybe(c) => stack.extend(c.map(|c| *c)),
            Node::Pair(p) => stack.extend([p.0, p.1]),
            Node::Record { child, .. } => stack.extend(child.map(|c| *c)),
            Node::Leaf(_) | Node::Text(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, body)) = data.split_first() else {
        return;
    };
    let max_depth = if limit == 0 { codec::DEFAULT_MAX_DEPTH } else { usize::from(limit % 32) + 1 };
    match codec::decode::<Node>(body, body.len(), max_depth) {
        Ok(node) => {
            let got = levels(&node);
            assert!(got <= max_depth, "{got} levels decoded under a limit of {max_depth}");
            drop_flat(node);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
