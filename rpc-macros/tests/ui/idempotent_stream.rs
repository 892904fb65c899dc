#[rpc_macros::service]
trait Feed {
    #[idempotent]
    async fn feed(&self, from: u64) -> ServerStream<u64>;
}

fn main() {}
