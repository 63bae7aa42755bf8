//! The trust domain's signing authorities: the X.509 CA that signs every X.509-SVID (`x509`)
//! and the keys that sign JWT-SVIDs (`jwt_keys`).

pub mod federation;
pub mod jwt_keys;
pub mod x509;
