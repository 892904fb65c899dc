#[rpc_macros::service]
trait Merge {
    async fn merge(&self, a: Streaming<u64>, b: Streaming<u64>) -> u64;
}

fn main() {}
