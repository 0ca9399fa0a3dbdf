//! Empty: the integration tests live in `it/`.
