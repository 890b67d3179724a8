//! The merge-method registry: listing it, and registering methods written in JavaScript.

use crate::errors::guarded;
use mecha_core::methods::external::{ExternalArg, ExternalCall, ExternalKernel, ExternalMethod, ExternalResult};
use mecha_core::methods::{
    registry, DefaultValue, Dispatch, MethodSpec, ParamKind, ParamSpec, ReturnSpec, SpaceSpec, ValueType,
};
use mecha_core::recipe::Scalar;
use mecha_core::MechaError;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::collections::HashMap;
use std::sync::Arc;

// Method registry

#[napi(object)]
pub struct SpaceInfo {
    /// True when the method's own merge-space variable is used (shared with the return value).
    pub symbol: bool,
    /// Allowed spaces.
    pub spaces: Vec<String>,
}

fn space_info(spec: &SpaceSpec) -> SpaceInfo {
    match spec {
        SpaceSpec::Symbol => SpaceInfo {
            symbol: true,
            spaces: mecha_core::recipe::spaces::SPACES.iter().map(|s| s.to_string()).collect(),
        },
        SpaceSpec::Fixed(v) => SpaceInfo { symbol: false, spaces: v.clone() },
    }
}

#[napi(object)]
pub struct ParamInfo {
    pub name: String,
    /// `Tensor`, `float`, `int`, `bool`, `str` or `T` (any).
    #[napi(js_name = "type")]
    pub value_type: String,
    pub state_dict: bool,
    pub merge_space: SpaceInfo,
    pub model_config: Option<String>,
    /// `positional`, `varargs` or `keyword`.
    pub kind: String,
    pub has_default: bool,
    #[napi(ts_type = "number | boolean | string | null | undefined")]
    pub default: Option<serde_json::Value>,
}

#[napi(object)]
pub struct MethodInfo {
    pub id: String,
    pub description: String,
    pub params: Vec<ParamInfo>,
    pub return_type: String,
    pub return_merge_space: SpaceInfo,
    pub return_model_config: Option<String>,
    pub is_conversion: bool,
    pub elementwise: bool,
    /// Calls are dispatched by config to one of the methods that implement it.
    pub is_interface: bool,
    /// The interface this method implements.
    pub implements: Option<String>,
}

fn method_info(m: &MethodSpec) -> MethodInfo {
    MethodInfo {
        id: m.id.clone(),
        description: m.description.clone(),
        params: m
            .params
            .iter()
            .map(|p| ParamInfo {
                name: p.name.clone(),
                value_type: p.value_type.name().to_string(),
                state_dict: p.state_dict,
                merge_space: space_info(&p.space),
                model_config: p.config.clone(),
                kind: match p.kind {
                    ParamKind::Positional => "positional",
                    ParamKind::VarPositional => "varargs",
                    ParamKind::KeywordOnly => "keyword",
                }
                .to_string(),
                has_default: p.default.is_some(),
                default: p.default.as_ref().map(|d| match d {
                    DefaultValue::Null => serde_json::Value::Null,
                    DefaultValue::Bool(b) => (*b).into(),
                    DefaultValue::Int(i) => (*i).into(),
                    DefaultValue::Float(f) => (*f).into(),
                    DefaultValue::Str(s) => s.clone().into(),
                }),
            })
            .collect(),
        return_type: m.returns.value_type.name().to_string(),
        return_merge_space: space_info(&m.returns.space),
        return_model_config: m.returns.config.clone(),
        is_conversion: m.is_conversion,
        elementwise: m.elementwise,
        is_interface: m.dispatch == Dispatch::Interface,
        implements: match &m.dispatch {
            Dispatch::Implements(id) => Some(id.clone()),
            _ => None,
        },
    }
}

/// Every registered merge method with its signature, for builders, docs and UIs.
#[napi]
pub fn methods() -> Vec<MethodInfo> {
    registry().list().iter().map(|m| method_info(m)).collect()
}

/// Which f16 conversion path this machine uses (`f16c` or `scalar`).
#[napi]
pub fn simd_path() -> String {
    mecha_core::kernels::convert::f16_path().to_string()
}

// Merge methods written in JavaScript

#[napi(object)]
pub struct JsParamSpec {
    pub name: String,
    /// `Tensor`, `float`, `int`, `bool`, `str` or `T`.
    #[napi(js_name = "type")]
    pub value_type: String,
    pub state_dict: bool,
    /// Allowed spaces; absent = the method's own merge-space variable.
    pub merge_space: Option<Vec<String>>,
    pub model_config: Option<String>,
    /// `positional`, `varargs` or `keyword`.
    pub kind: String,
    pub has_default: bool,
    #[napi(ts_type = "number | boolean | string | null | undefined")]
    pub default: Option<serde_json::Value>,
    /// With `default` a number: write it as an integer in `.mecha` text.
    pub default_is_int: Option<bool>,
}

#[napi(object)]
pub struct JsMethodSpec {
    pub id: String,
    pub description: String,
    pub params: Vec<JsParamSpec>,
    #[napi(js_name = "returnType")]
    pub return_type: String,
    /// Absent = the method's own merge-space variable.
    pub return_merge_space: Option<String>,
    pub return_model_config: Option<String>,
    pub elementwise: bool,
    pub is_conversion: bool,
    /// The interface (e.g. `exchange_ema`) this method implements for its inputs' configs.
    pub implements: Option<String>,
    /// Output key → keys of the first input (from `mapKeys`).
    pub routes: Option<HashMap<String, Vec<String>>>,
}

/// One call of a JavaScript method, as JavaScript receives it.
#[napi(object, object_from_js = false)]
pub struct JsMethodCall {
    pub context: u32,
    /// Index of the node in the JSON recipe (absent for nodes created while binding).
    pub node: Option<u32>,
    pub key: String,
    pub shape: Vec<i64>,
    pub offset: f64,
    pub length: f64,
    pub args: Vec<JsMethodArg>,
}

/// One parameter's value: exactly one field is set (`isNull` for a null text value). Tensors
/// come with their own shape (for elementwise methods, a chunk of it).
#[napi(object, object_from_js = false)]
pub struct JsMethodArg {
    pub tensor: Option<crate::buffers::F32Values>,
    pub shape: Option<Vec<i64>>,
    /// Varargs (or several keys of a routed input): each entry is one argument.
    pub items: Option<Vec<JsMethodArg>>,
    pub number: Option<f64>,
    pub boolean: Option<bool>,
    pub text: Option<String>,
    pub is_null: bool,
}

type JsMethodFn =
    ThreadsafeFunction<JsMethodCall, Either3<Float32Array, f64, String>, JsMethodCall, Status, false, true>;

struct JsKernel {
    id: String,
    function: JsMethodFn,
}

fn js_arg(arg: ExternalArg) -> JsMethodArg {
    let empty =
        JsMethodArg { tensor: None, shape: None, items: None, number: None, boolean: None, text: None, is_null: false };
    match arg {
        ExternalArg::Tensor { data, shape } => JsMethodArg {
            tensor: Some(crate::buffers::F32Values(data.into_owned())),
            shape: Some(shape.iter().map(|&d| d as i64).collect()),
            ..empty
        },
        ExternalArg::Many(items) => JsMethodArg { items: Some(items.into_iter().map(js_arg).collect()), ..empty },
        ExternalArg::Value(Scalar::Null) => JsMethodArg { is_null: true, ..empty },
        ExternalArg::Value(Scalar::Bool(b)) => JsMethodArg { boolean: Some(b), ..empty },
        ExternalArg::Value(Scalar::Str(t)) => JsMethodArg { text: Some(t), ..empty },
        ExternalArg::Value(v) => JsMethodArg { number: v.as_f64(), ..empty },
    }
}

impl ExternalKernel for JsKernel {
    fn call(&self, call: ExternalCall<'_>) -> mecha_core::Result<ExternalResult> {
        let js = JsMethodCall {
            context: call.context as u32,
            node: call.node.map(|n| n as u32),
            key: call.key.to_string(),
            shape: call.shape.iter().map(|&d| d as i64).collect(),
            offset: call.offset as f64,
            length: call.len as f64,
            args: call.args.into_iter().map(js_arg).collect(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let status = self.function.call_with_return_value(js, ThreadsafeFunctionCallMode::Blocking, move |ret, _| {
            let values = ret.map(|r| match r {
                Either3::A(array) => ExternalResult::Tensor(array.to_vec()),
                Either3::B(number) => ExternalResult::Value(Scalar::Float(number)),
                Either3::C(text) => ExternalResult::Value(Scalar::Str(text)),
            });
            let _ = tx.send(values);
            Ok(())
        });
        let failed =
            |why: String| MechaError::recipe(format!("merge method {} failed on key \"{}\": {why}", self.id, call.key));
        if status != Status::Ok {
            return Err(failed(format!("the JavaScript function could not be called ({status})")));
        }
        rx.recv()
            .map_err(|_| failed("the JavaScript function never returned".into()))?
            .map_err(|e| failed(e.reason.clone()))
    }
}

fn param_spec(p: JsParamSpec) -> mecha_core::Result<ParamSpec> {
    let value_type = match p.value_type.as_str() {
        "Tensor" => ValueType::Tensor,
        "float" => ValueType::Float,
        "int" => ValueType::Int,
        "bool" => ValueType::Bool,
        "str" => ValueType::Str,
        "T" => ValueType::Any,
        other => return Err(MechaError::recipe(format!("parameter \"{}\": unknown type \"{other}\"", p.name))),
    };
    let kind = match p.kind.as_str() {
        "positional" => ParamKind::Positional,
        "varargs" => ParamKind::VarPositional,
        "keyword" => ParamKind::KeywordOnly,
        other => return Err(MechaError::recipe(format!("parameter \"{}\": unknown kind \"{other}\"", p.name))),
    };
    let default = if !p.has_default {
        None
    } else {
        Some(match p.default {
            None | Some(serde_json::Value::Null) => DefaultValue::Null,
            Some(serde_json::Value::Bool(b)) => DefaultValue::Bool(b),
            Some(serde_json::Value::String(s)) => DefaultValue::Str(s),
            Some(serde_json::Value::Number(n)) if p.default_is_int == Some(true) => {
                DefaultValue::Int(n.as_f64().unwrap_or(0.0) as i64)
            }
            Some(serde_json::Value::Number(n)) => DefaultValue::Float(n.as_f64().unwrap_or(0.0)),
            Some(other) => {
                return Err(MechaError::recipe(format!("parameter \"{}\": unsupported default {other}", p.name)))
            }
        })
    };
    Ok(ParamSpec {
        name: p.name,
        value_type,
        state_dict: p.state_dict,
        space: p.merge_space.map_or(SpaceSpec::Symbol, SpaceSpec::Fixed),
        config: p.model_config,
        kind,
        default,
    })
}

/// Registers a merge method implemented by a JavaScript function; it then works in recipes,
/// `.mecha` text and `methods()` like a builtin.
#[napi]
pub fn register_method(
    env: Env,
    spec: JsMethodSpec,
    #[napi(ts_arg_type = "(call: JsMethodCall) => Float32Array | number | string")] callback: JsMethodFn,
) -> napi::Result<()> {
    let run = || -> mecha_core::Result<()> {
        let params = spec.params.into_iter().map(param_spec).collect::<mecha_core::Result<Vec<_>>>()?;
        let returns = ReturnSpec {
            value_type: param_spec(JsParamSpec {
                name: "return".into(),
                value_type: spec.return_type,
                state_dict: false,
                merge_space: None,
                model_config: None,
                kind: "positional".into(),
                has_default: false,
                default: None,
                default_is_int: None,
            })?
            .value_type,
            space: spec.return_merge_space.map_or(SpaceSpec::Symbol, |s| SpaceSpec::Fixed(vec![s])),
            config: spec.return_model_config,
        };
        let kernel = Arc::new(JsKernel { id: spec.id.clone(), function: callback });
        let method = MethodSpec {
            id: spec.id,
            description: spec.description,
            params,
            returns,
            implementation: Arc::new(ExternalMethod {
                kernel,
                elementwise: spec.elementwise,
                routes: spec.routes.map(|routes| routes.into_iter().collect()),
            }),
            elementwise: spec.elementwise,
            is_conversion: spec.is_conversion,
            dispatch: spec.implements.map_or(Dispatch::Direct, Dispatch::Implements),
        };
        registry().register(method)
    };
    guarded(&env, "register_method", run)
}
