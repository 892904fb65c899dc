#[rpc_macros::service]
pub trait Store {
    async fn put<T>(&self, value: T);
}

fn main() {}
