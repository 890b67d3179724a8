//! Methods that route or convert values rather than compute on them (sd-mecha `logistics.py`
//! and `convert_singleton_to_any.py`). The planner resolves them per key before any data is read.

use super::decl::*;
use super::{DefaultValue, Implementation, MethodSpec, SpaceSpec, ValueType};

pub const SINGLETON_CONFIG: &str = "singleton-mecha";

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::{Any, Str, Tensor};
    vec![
        MethodSpec {
            id: "fallback".into(),
            description: "a where it has the key, otherwise default (the `or` operator).".into(),
            params: vec![same_space("a", Any).state_dict(), same_space("default", Any).state_dict()],
            returns: returns(Any, SpaceSpec::Symbol),
            implementation: Implementation::Fallback,
            is_conversion: false,
        },
        MethodSpec {
            id: "cast".into(),
            description: "Rounds values to a dtype (torch names such as \"float16\", \"bfloat16\"). \
                          device is accepted for compatibility; computation stays on the CPU."
                .into(),
            params: vec![
                same_space("a", Tensor),
                hyper("device", Str, DefaultValue::Null),
                hyper("dtype", Str, DefaultValue::Null),
            ],
            returns: returns(Tensor, SpaceSpec::Symbol),
            implementation: Implementation::Cast,
            is_conversion: false,
        },
        component_method(
            "pick_component",
            "Keeps only the keys of one component of a's model config (e.g. \"diffuser\", \"clip_l\").",
            false,
        ),
        component_method("omit_component", "Drops the keys of one component of a's model config.", true),
        MethodSpec {
            id: "convert_singleton".into(),
            description: "Broadcasts the single value of a singleton-mecha literal to every key.".into(),
            params: vec![same_space("singleton", Any).state_dict().config(SINGLETON_CONFIG)],
            returns: returns(Any, SpaceSpec::Symbol),
            implementation: Implementation::ConvertSingleton,
            is_conversion: true,
        },
    ]
}

/// `pick_component` / `omit_component`: `a` filtered by one component of its config.
fn component_method(id: &str, description: &str, omit: bool) -> MethodSpec {
    use ValueType::{Any, Str};
    MethodSpec {
        id: id.into(),
        description: description.into(),
        params: vec![same_space("a", Any).state_dict(), input("component", Str, SpaceSpec::fixed(&["param"]))],
        returns: returns(Any, SpaceSpec::Symbol),
        implementation: Implementation::Component { omit },
        is_conversion: false,
    }
}
