//! llumen-store
