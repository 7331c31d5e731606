//! The admin console: the virtual database `pgsilo` (alias `pgbouncer`).

use std::rc::Rc;

use monoio::net::TcpStream;

use crate::proxy::login::{send_fatal, AdminLogin};
use crate::runtime::worker::WorkerCtx;

pub async fn serve(_ctx: Rc<WorkerCtx>, mut stream: TcpStream, _who: AdminLogin) {
    send_fatal(&mut stream, "0A000", "the admin console is not available yet").await;
}
