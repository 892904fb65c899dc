#[rpc_macros::service]
pub trait Factory {
    async fn new(&self) -> u64;
}

fn main() {}
