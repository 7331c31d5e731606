//! Reading the few fields of an X.509 certificate pgsilo needs (filled in by a helper).
