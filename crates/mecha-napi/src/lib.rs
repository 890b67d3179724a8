//! placeholder while the binding is written
