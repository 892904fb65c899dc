#[rpc_macros::service]
pub trait Store {
    #[idempotent(always)]
    async fn get(&self, key: String) -> String;
}

fn main() {}
