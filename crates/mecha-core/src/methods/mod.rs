//! The merge-method registry: every method's signature is declared here once (inputs, types,
//! merge spaces, defaults, return space, how it computes). The TypeScript builders, their types,
//! the docs listing and `methods.list()` are all derived from these declarations.

pub mod balance;
pub mod blocks;
pub mod cosine;
pub mod crossover;
pub mod elementwise;
pub mod ema;
pub mod external;
pub mod formats;
pub mod limiting;
pub mod linear;
pub mod logistics;
pub mod lycoris;
pub mod lycoris_extract;
pub mod permutations;
pub mod seam;
pub mod slicing;
pub mod svd;
pub mod ties;
pub mod wholemath;

pub use seam::{Arg, ChunkKernel, Decision, KeyRelation, Method, Output, PlanCall, RunCall};

use std::sync::{Arc, OnceLock, RwLock};

use crate::error::{MechaError, Result};

/// What a parameter receives for each key.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ValueType {
    Tensor,
    Float,
    Int,
    Bool,
    Str,
    /// A type variable: whatever the argument produces (sd-mecha's `T`).
    Any,
}

impl ValueType {
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Tensor => "Tensor",
            ValueType::Float => "float",
            ValueType::Int => "int",
            ValueType::Bool => "bool",
            ValueType::Str => "str",
            ValueType::Any => "T",
        }
    }
}

/// Merge spaces a parameter or return value may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpaceSpec {
    /// The method's own type variable: every input and the return marked this way share one space.
    Symbol,
    /// One of these spaces.
    Fixed(Vec<String>),
}

impl SpaceSpec {
    pub fn fixed(spaces: &[&str]) -> SpaceSpec {
        SpaceSpec::Fixed(spaces.iter().map(|s| s.to_string()).collect())
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Written positionally in `.mecha` text.
    Positional,
    /// `*models`: any number of positional arguments.
    VarPositional,
    /// Written as `name=` in `.mecha` text.
    KeywordOnly,
}

/// A parameter default, materialised into the graph when the method is called (as sd-mecha does).
#[derive(Clone, Debug, PartialEq)]
pub enum DefaultValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub value_type: ValueType,
    /// The method reads other keys of this input (sd-mecha's `StateDict[...]`).
    pub state_dict: bool,
    pub space: SpaceSpec,
    pub config: Option<String>,
    pub kind: ParamKind,
    pub default: Option<DefaultValue>,
}

#[derive(Clone, Debug)]
pub struct ReturnSpec {
    pub value_type: ValueType,
    pub space: SpaceSpec,
    pub config: Option<String>,
}

#[derive(Clone)]
pub struct MethodSpec {
    pub id: String,
    pub description: String,
    pub params: Vec<ParamSpec>,
    pub returns: ReturnSpec,
    pub implementation: Arc<dyn Method>,
    /// Results combine elements at the same position only (streamed in chunks when planned so).
    pub elementwise: bool,
    pub is_conversion: bool,
    /// What calling the method does: compute it, or pick an implementation by config.
    pub dispatch: Dispatch,
}

/// sd-mecha's interfaces: a method id whose calls are dispatched, by the configs of the
/// arguments, to one of the methods registered as implementing it (`exchange_ema` →
/// `exchange_ema_'sd1-ldm'`). A new config gets its own implementation by registering one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// A plain method (or an implementation, which is one too).
    Direct,
    /// Chosen per call among the implementations, in registration order.
    Interface,
    /// An implementation of this interface: same parameters, configs fixed.
    Implements(String),
}

impl std::fmt::Debug for MethodSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MethodSpec").field("id", &self.id).finish_non_exhaustive()
    }
}

impl MethodSpec {
    pub fn param(&self, name: &str) -> Option<(usize, &ParamSpec)> {
        self.params.iter().enumerate().find(|(_, p)| p.name == name)
    }

    pub fn varargs(&self) -> Option<usize> {
        self.params.iter().position(|p| p.kind == ParamKind::VarPositional)
    }

    /// A method that is neither elementwise nor a conversion.
    pub fn new(
        id: &str,
        description: &str,
        params: Vec<ParamSpec>,
        returns: ReturnSpec,
        implementation: impl Method + 'static,
    ) -> MethodSpec {
        MethodSpec {
            id: id.into(),
            description: description.into(),
            params,
            returns,
            implementation: Arc::new(implementation),
            elementwise: false,
            is_conversion: false,
            dispatch: Dispatch::Direct,
        }
    }

    /// An interface: the implementations do the work ([`Dispatch`]).
    pub fn interface(id: &str, description: &str, params: Vec<ParamSpec>, returns: ReturnSpec) -> MethodSpec {
        MethodSpec { dispatch: Dispatch::Interface, ..MethodSpec::new(id, description, params, returns, InterfaceCall) }
    }

    /// Marks the method as an implementation of `interface`.
    pub fn implements(mut self, interface: &str) -> Self {
        self.dispatch = Dispatch::Implements(interface.into());
        self
    }

    pub fn elementwise(mut self) -> Self {
        self.elementwise = true;
        self
    }

    pub fn conversion(mut self) -> Self {
        self.is_conversion = true;
        self
    }
}

/// Builders used by the method files to declare signatures tersely.
pub(crate) mod decl {
    use super::*;

    pub fn input(name: &str, value_type: ValueType, space: SpaceSpec) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            value_type,
            state_dict: false,
            space,
            config: None,
            kind: ParamKind::Positional,
            default: None,
        }
    }

    /// A parameter that shares the method's merge space (sd-mecha's default for inputs).
    pub fn same_space(name: &str, value_type: ValueType) -> ParamSpec {
        input(name, value_type, SpaceSpec::Symbol)
    }

    /// A hyper-parameter with a default; sd-mecha requires these to be in `param` space.
    pub fn hyper(name: &str, value_type: ValueType, default: DefaultValue) -> ParamSpec {
        ParamSpec { default: Some(default), ..input(name, value_type, SpaceSpec::fixed(&["param"])) }
    }

    impl ParamSpec {
        pub fn state_dict(mut self) -> Self {
            self.state_dict = true;
            self
        }
        pub fn varargs(mut self) -> Self {
            self.kind = ParamKind::VarPositional;
            self
        }
        pub fn keyword_only(mut self) -> Self {
            self.kind = ParamKind::KeywordOnly;
            self
        }
        pub fn config(mut self, config: &str) -> Self {
            self.config = Some(config.into());
            self
        }
    }

    pub fn returns(value_type: ValueType, space: SpaceSpec) -> ReturnSpec {
        ReturnSpec { value_type, space, config: None }
    }
}

/// The body of an interface: never planned, since merges replace the call by an implementation
/// first (`recipe::dispatch`).
struct InterfaceCall;

impl Method for InterfaceCall {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        Err(call.fail("is an interface; its calls are dispatched to an implementation before planning"))
    }
}

/// The set of methods recipes can use: the builtins plus anything registered at run time.
pub struct Registry {
    methods: RwLock<Vec<Arc<MethodSpec>>>,
}

impl Registry {
    fn with_builtins() -> Registry {
        let mut methods = Vec::new();
        methods.extend(linear::methods());
        methods.extend(limiting::methods());
        methods.extend(logistics::methods());
        methods.extend(blocks::methods());
        methods.extend(cosine::methods());
        methods.extend(crossover::methods());
        methods.extend(slicing::methods());
        methods.extend(ties::methods());
        methods.extend(svd::methods());
        methods.extend(formats::methods());
        methods.extend(lycoris::methods());
        methods.extend(lycoris_extract::methods());
        methods.extend(ema::methods());
        methods.extend(permutations::methods());
        methods.extend(balance::methods());
        Registry { methods: RwLock::new(methods.into_iter().map(Arc::new).collect()) }
    }

    pub fn get(&self, id: &str) -> Option<Arc<MethodSpec>> {
        self.methods.read().expect("registry lock").iter().find(|m| m.id == id).cloned()
    }

    /// Looks a method up, or fails with the closest known name as a suggestion.
    pub fn resolve(&self, id: &str) -> Result<Arc<MethodSpec>> {
        self.get(id).ok_or_else(|| {
            let ids: Vec<String> = self.list().iter().map(|m| m.id.clone()).collect();
            let hint = crate::util::nearest(id, ids.iter().map(String::as_str))
                .map(|n| format!(" Did you mean \"{n}\"?"))
                .unwrap_or_default();
            MechaError::recipe(format!("unknown merge method \"{id}\".{hint}"))
        })
    }

    pub fn list(&self) -> Vec<Arc<MethodSpec>> {
        self.methods.read().expect("registry lock").clone()
    }

    /// The implementations of an interface, in registration order.
    pub fn implementations(&self, interface: &str) -> Vec<Arc<MethodSpec>> {
        let wanted = Dispatch::Implements(interface.to_string());
        self.list().into_iter().filter(|m| m.dispatch == wanted).collect()
    }

    /// Adds a method. Ids are never reused, as in sd-mecha.
    pub fn register(&self, method: MethodSpec) -> Result<()> {
        validate(&method)?;
        if let Dispatch::Implements(interface) = &method.dispatch {
            let interface = self.resolve(interface)?;
            validate_implementation(&interface, &method)?;
        }
        let mut methods = self.methods.write().expect("registry lock");
        if methods.iter().any(|m| m.id == method.id) {
            return Err(MechaError::recipe(format!(
                "a merge method \"{}\" is already registered; choose another id",
                method.id
            )));
        }
        methods.push(Arc::new(method));
        Ok(())
    }
}

/// sd-mecha's rules for a signature.
fn validate(m: &MethodSpec) -> Result<()> {
    let fail = |msg: String| Err(MechaError::recipe(format!("merge method \"{}\": {msg}", m.id)));
    if m.id.is_empty() || !m.id.chars().all(|c| c.is_ascii_alphanumeric() || "_-.'".contains(c)) {
        return fail("ids use letters, digits, '_', '-', '.' and quotes".into());
    }
    const RESERVED: [&str; 4] = ["key", "key_relation", "cache", "output_reused"];
    let mut seen = std::collections::HashSet::new();
    let mut after_varargs = false;
    for p in &m.params {
        if RESERVED.contains(&p.name.as_str()) {
            return fail(format!("\"{}\" is a reserved parameter name", p.name));
        }
        if !seen.insert(p.name.as_str()) {
            return fail(format!("parameter \"{}\" is declared twice", p.name));
        }
        if p.default.is_some() && p.space != SpaceSpec::fixed(&["param"]) {
            return fail(format!("parameter \"{}\" has a default, so its merge space must be param", p.name));
        }
        match p.kind {
            ParamKind::VarPositional if after_varargs => return fail("only one varargs parameter is allowed".into()),
            ParamKind::VarPositional => after_varargs = true,
            ParamKind::Positional if after_varargs => {
                return fail(format!("parameter \"{}\" after varargs must be keyword-only", p.name))
            }
            _ => {}
        }
    }
    if m.returns.space == SpaceSpec::Symbol && !m.params.iter().any(|p| p.space == SpaceSpec::Symbol) {
        return fail("the result uses the method's merge-space variable, so an input must too".into());
    }
    if m.is_conversion
        && (m.params.first().and_then(|p| p.config.as_ref()).is_none()
            || m.params.iter().filter(|p| p.default.is_none()).count() != 1)
    {
        return fail("a conversion takes exactly one input, with an explicit model config".into());
    }
    Ok(())
}

/// An implementation has its interface's parameters (names, kinds, types, defaults) and fixes
/// the config of at least one input, which is what dispatch looks at.
fn validate_implementation(interface: &MethodSpec, m: &MethodSpec) -> Result<()> {
    let fail = |msg: String| {
        Err(MechaError::recipe(format!("merge method \"{}\" implements \"{}\", but {msg}", m.id, interface.id)))
    };
    if interface.dispatch != Dispatch::Interface {
        return fail(format!("\"{}\" is not an interface", interface.id));
    }
    if m.params.len() != interface.params.len() {
        return fail(format!(
            "it has {} parameters where the interface has {}",
            m.params.len(),
            interface.params.len()
        ));
    }
    for (p, q) in m.params.iter().zip(&interface.params) {
        if p.name != q.name || p.kind != q.kind || p.value_type != q.value_type || p.default != q.default {
            return fail(format!(
                "parameter \"{}\" differs from the interface's \"{}\" (name, kind, type or default)",
                p.name, q.name
            ));
        }
        if q.config.is_some() && p.config != q.config {
            return fail(format!("parameter \"{}\" must keep the interface's config", p.name));
        }
    }
    if !m.params.iter().any(|p| p.config.is_some()) {
        return fail("none of its inputs has a model config to dispatch on".into());
    }
    Ok(())
}

pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::with_builtins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_param_space_and_symbols_are_used() {
        for m in registry().list() {
            for p in &m.params {
                if p.default.is_some() {
                    assert_eq!(p.space, SpaceSpec::fixed(&["param"]), "{}.{}", m.id, p.name);
                }
            }
            if m.returns.space == SpaceSpec::Symbol {
                assert!(m.params.iter().any(|p| p.space == SpaceSpec::Symbol), "{}", m.id);
            }
        }
    }

    #[test]
    fn builtin_implementations_fit_their_interfaces() {
        let r = registry();
        let mut found = 0;
        for m in r.list() {
            if let Dispatch::Implements(interface) = &m.dispatch {
                validate_implementation(&r.resolve(interface).unwrap(), &m).unwrap();
                found += 1;
            }
        }
        assert!(found > 0);
    }

    #[test]
    fn an_implementation_must_match_its_interface() {
        let interface = registry().resolve("exchange_ema").unwrap();
        let mut wrong = (*registry().resolve("exchange_ema_'sd1-ldm'").unwrap()).clone();
        wrong.id = "exchange_ema_wrong".into();
        wrong.params[0].name = "other".into();
        let err = validate_implementation(&interface, &wrong).unwrap_err();
        assert!(err.message.contains("differs from the interface"), "{}", err.message);
        wrong.params[0].name = "model".into();
        wrong.params[0].config = None;
        assert!(validate_implementation(&interface, &wrong).is_err());
    }

    #[test]
    fn unknown_methods_get_a_suggestion() {
        let err = registry().resolve("weighted_summ").unwrap_err();
        assert!(err.message.contains("weighted_sum"), "{}", err.message);
    }
}
