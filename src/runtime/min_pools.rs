//! min_pool_size before any client: as PgBouncer does, the pool of a database with a
//! forced user (`user =` in its section) is made at start and on reload and filled in
//! the background, when pgsilo can log in as that user on its own (a password in the
//! section or a plain-text or md5 one in the auth_file, or none for a server that
//! trusts it). A SCRAM verifier alone needs a client's SCRAM login first, so such a pool
//! fills once one has logged in. Other pools exist from their first client's login on.

use std::rc::Rc;

use crate::context::WorkerCtx;
use crate::pool::Credential;
use crate::proxy::login::pool_definition;

/// Makes this worker's side of every pool min_pool_size asks to keep open ahead of
/// clients; the worker's maintenance fills it.
pub fn open_ahead(ctx: &Rc<WorkerCtx>) {
    let config = ctx.instance.config();
    for (name, db) in &config.databases {
        let Some(forced) = db.user.as_deref() else {
            continue;
        };
        if db.effective_min_pool_size(&config.general) == 0 {
            continue;
        }
        let definition = pool_definition(&config, &ctx.instance.userlist(), &ctx.instance.tls(), name, forced);
        if matches!(definition.2.credential, Credential::Scram(_)) {
            continue;
        }
        let shared = ctx.instance.pools.get_or_create(name, forced, || definition);
        ctx.local_pool(&shared);
    }
}
