//! placeholder until the example app lands
pub fn serve(_worker: zygote_runtime::Worker) -> i32 {
    log::error!("the example app is not built yet");
    2
}
