use super::*;

/// Key counts per builtin, union over components, as in sd-mecha's YAML files.
const KEY_COUNTS: [(&str, usize); 11] = [
    ("flux-flux", 1439),
    ("sd1-kohya", 1130),
    ("sd1-ldm", 1831),
    ("sd1-supermerger_blocks", 26),
    ("sd3-comfyui", 1672),
    ("sdxl-diffusers_unet_only", 1680),
    ("sdxl-kohya", 2642),
    ("sdxl-kohya_but_diffusers", 2642),
    ("sdxl-sgm", 2531),
    ("sdxl-supermerger_blocks", 21),
    ("singleton-mecha", 1),
];

fn optional_count(config: &ModelConfig) -> usize {
    config.keys().filter(|(_, meta)| meta.optional).count()
}

fn alias_count(config: &ModelConfig) -> usize {
    config.keys().map(|(_, meta)| meta.aliases.len()).sum()
}

#[test]
fn every_builtin_loads_with_the_expected_key_count() {
    let ids: Vec<&str> = KEY_COUNTS.iter().map(|(id, _)| *id).collect();
    assert_eq!(builtin_ids(), ids);
    for (id, count) in KEY_COUNTS {
        let config = builtin(id).unwrap();
        assert_eq!(config.id, id);
        assert_eq!(config.key_count(), count, "{id}");
        assert_eq!(config.keys().count(), count, "{id}");
    }
    assert!(builtin("sd1-nope").is_none());
}

#[test]
fn sd1_ldm_components_keys_and_aliases() {
    let config = builtin("sd1-ldm").unwrap();
    let components: Vec<(&str, usize)> =
        config.components().iter().map(|(name, c)| (name.as_str(), c.keys.len())).collect();
    assert_eq!(components, [("clip_l", 197), ("vae", 248), ("diffuser", 686), ("ema", 688), ("scheduler", 12)]);
    assert_eq!(optional_count(&config), 701);
    assert_eq!((config.architecture(), config.implementation()), ("sd1", "ldm"));

    let position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids";
    let alias = "cond_stage_model.transformer.embeddings.position_ids";
    let meta = config.get(position_ids).unwrap();
    assert_eq!(meta.dtype, Some(DType::I64));
    assert_eq!(meta.shape.as_deref(), Some(&[1, 77][..]));
    assert_eq!(meta.aliases, [alias]);
    assert!(meta.optional);
    assert_eq!(config.component_of(position_ids), Some("clip_l"));
    assert_eq!(config.resolve_alias(alias), Some(position_ids));
    assert_eq!(config.resolve_alias(position_ids), Some(position_ids));
    assert_eq!(config.resolve_alias("nope"), None);
    assert!(config.get(alias).is_none(), "get() takes canonical keys only");

    // keys() runs component by component, in file order.
    let first = config.keys().next().unwrap().0;
    assert_eq!(first, "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight");
    let first_vae = config.keys().nth(197).unwrap().0;
    assert_eq!(config.component_of(first_vae), Some("vae"));
}

#[test]
fn other_builtin_details() {
    assert_eq!(optional_count(&builtin("sdxl-sgm").unwrap()), 51);

    let flux = builtin("flux-flux").unwrap();
    assert_eq!(flux.declared_identifier, "flux_dev-flux");
    assert_eq!(alias_count(&flux), 780);
    let (key, meta) = flux.keys().next().unwrap();
    assert_eq!(meta.dtype, Some(DType::BF16));
    assert_eq!(flux.resolve_alias(&meta.aliases[0]), Some(key));

    let kohya = builtin("sdxl-kohya_but_diffusers").unwrap();
    assert_eq!(kohya.declared_identifier, "sdxl-kohya");
    assert_eq!(kohya.implementation(), "kohya_but_diffusers");

    let blocks = builtin("sd1-supermerger_blocks").unwrap();
    assert_eq!(blocks.get("BASE").unwrap().shape, Some(vec![]));

    let singleton = builtin("singleton-mecha").unwrap();
    let unknown = KeyMeta { shape: None, dtype: None, aliases: vec![], optional: false };
    assert_eq!(singleton.get("key"), Some(&unknown));
}

#[test]
fn list_is_reverse_sorted_by_identifier() {
    let ids: Vec<String> = list().iter().map(|c| c.id.clone()).collect();
    // Other tests register configs concurrently; they sort in but are not asserted on here.
    let builtins: Vec<&str> = ids.iter().map(String::as_str).filter(|id| builtin(id).is_some()).collect();
    assert_eq!(builtins[..3], ["singleton-mecha", "sdxl-supermerger_blocks", "sdxl-sgm"]);
    assert_eq!(builtins.len(), KEY_COUNTS.len());
    let mut sorted = ids.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted);
}

const USER_YAML: &str = "\
identifier: tiny-test
components:
  unet:
    a.weight: {shape: [4, 2], dtype: float16, aliases: [old.a.weight]}
    a.bias: {shape: [4], dtype: float32, optional: true}
  extra:
    step: {dtype: int64}
    anything: {}
";

#[test]
fn from_yaml_reads_a_user_config() {
    let config = from_yaml(USER_YAML, None).unwrap();
    assert_eq!((config.id.as_str(), config.declared_identifier.as_str()), ("tiny-test", "tiny-test"));
    let keys: Vec<&str> = config.keys().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a.weight", "a.bias", "step", "anything"]);
    let a = config.get("a.weight").unwrap();
    assert_eq!((a.shape.as_deref(), a.dtype), (Some(&[4, 2][..]), Some(DType::F16)));
    assert!(config.get("a.bias").unwrap().optional);
    let step = config.get("step").unwrap();
    assert_eq!((step.shape.as_ref(), step.dtype), (None, Some(DType::I64)));
    assert_eq!(config.resolve_alias("old.a.weight"), Some("a.weight"));
    assert_eq!(config.component_of("step"), Some("extra"));

    // Like sd-mecha, a file registers under its stem.
    let config = from_yaml(USER_YAML, Some("tiny-renamed")).unwrap();
    assert_eq!((config.id.as_str(), config.declared_identifier.as_str()), ("tiny-renamed", "tiny-test"));
}

fn yaml_error(text: &str) -> MechaError {
    let err = from_yaml(text, None).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config, "{err}");
    err
}

fn with_key(meta: &str) -> String {
    format!("identifier: tiny-test\ncomponents:\n  unet:\n    k: {meta}\n")
}

#[test]
fn from_yaml_errors_say_what_is_wrong() {
    let cases = [
        (with_key("{shape: [4], dtype: float17}"), "key \"k\": unknown dtype \"float17\""),
        (with_key("{shape: [-1]}"), "key \"k\": shape dimension -1 is not a non-negative integer"),
        (with_key("{shape: 4}"), "`shape` must be a list of integers, not 4"),
        (with_key("{optional: yes}"), "`optional` must be true or false, not \"yes\""),
        (with_key("{size: [4]}"), "unknown field \"size\""),
        (with_key("[4]"), "key \"k\": expected a mapping"),
        (with_key("{aliases: [k]}"), "\"k\" is both a key of component \"unet\" and an alias of \"k\""),
        ("identifier: Tiny\ncomponents: {}\n".into(), "invalid model config identifier \"Tiny\""),
        ("identifier: tiny-test\n".into(), "`components` must be a mapping"),
        ("components: {}\n".into(), "missing `identifier`"),
        ("identifier: tiny-test\ncomponents: {}\nmetadata: 1\n".into(), "unknown top-level field \"metadata\""),
        ("identifier: tiny-test\ncomponents:\n  unet: 3\n".into(), "component \"unet\" must be a mapping"),
        ("a: 1\n---\nb: 2\n".into(), "expected one YAML document, found 2"),
        ("identifier: \"a\tb\"\ncomponents: {}\n".into(), "must be non-empty and hold no tab"),
    ];
    for (text, expected) in cases {
        let err = yaml_error(&text);
        assert!(err.message.contains(expected), "{text:?}: {}", err.message);
    }

    let twice = "identifier: tiny-test\ncomponents:\n  a:\n    k: {}\n  b:\n    j: {aliases: [k]}\n";
    let err = yaml_error(twice);
    assert!(err.message.contains("\"k\" is both a key of component \"a\" and an alias of \"j\""), "{}", err.message);

    let err = yaml_error("identifier: tiny-test\ncomponents:\n  unet:\n    k: {shape: [1}\n");
    assert!(err.message.starts_with("model config YAML: invalid YAML at line 4"), "{}", err.message);
    assert_eq!(err.line, Some(4));

    let err = yaml_error(&with_key("{}").replace("k: {}", "k: {}\n    k: {}"));
    assert!(err.message.contains("duplicated key"), "{}", err.message);
}

#[test]
fn register_then_resolve() {
    register(from_yaml(USER_YAML, Some("test-registered")).unwrap()).unwrap();
    let config = resolve("test-registered").unwrap();
    assert_eq!(config.declared_identifier, "tiny-test");
    assert!(list().iter().any(|c| c.id == "test-registered"));
    assert_eq!(resolve("sd1-ldm").unwrap().key_count(), 1831);

    let again = register(from_yaml(USER_YAML, Some("test-registered")).unwrap()).unwrap_err();
    assert_eq!(again.kind, ErrorKind::Config);
    assert!(again.message.contains("\"test-registered\" is already registered"), "{}", again.message);
    let builtin_clash = register(from_yaml(USER_YAML, Some("sd1-ldm")).unwrap()).unwrap_err();
    assert!(builtin_clash.message.contains("already registered"));

    let mut renamed = from_yaml(USER_YAML, None).unwrap();
    renamed.id = "no_dash".into();
    assert!(register(renamed).unwrap_err().message.contains("invalid model config identifier"));
}

#[test]
fn resolve_suggests_the_nearest_identifier() {
    let err = resolve("sdxl-sgn").unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert_eq!(err.message, "unknown model config \"sdxl-sgn\"; did you mean \"sdxl-sgm\"?");
    let err = resolve("zzzzzzzzzzzzzzzz").unwrap_err();
    assert!(err.message.contains("known configs: flux-flux, sd1-kohya"), "{}", err.message);
}

#[test]
fn lycoris_configs_are_derived_like_sd_mecha() {
    // sd-mecha's 11 suffixes per low-rank key (12485 and 4708 keys), plus LoHa's 6.
    for (id, count) in [
        ("sdxl-kohya_kohya_lora", 12485 / 11 * 17),
        ("sdxl-kohya_lycoris_lora", 12485 / 11 * 17),
        ("sdxl-kohya_but_diffusers_kohya_lora", 12485 / 11 * 17),
        ("sdxl-kohya_but_diffusers_lycoris_lora", 12485 / 11 * 17),
        ("sd1-kohya_kohya_lora", 4708 / 11 * 17),
        ("sd1-kohya_lycoris_lora", 4708 / 11 * 17),
    ] {
        let config = resolve(id).unwrap();
        assert_eq!(config.key_count(), count, "{id}");
        assert!(config.keys().all(|(_, m)| m.optional), "{id}");
    }
    let lora = resolve("sdxl-kohya_kohya_lora").unwrap();
    let key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_up.weight";
    assert!(lora.get(key).is_some());
    assert_eq!(
        lora.get("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.alpha").unwrap().shape,
        Some(vec![])
    );

    let ids: Vec<String> = list().iter().map(|c| c.id.clone()).filter(|id| !id.starts_with("test")).collect();
    assert_eq!(
        ids,
        [
            "singleton-mecha",
            "sdxl-supermerger_blocks",
            "sdxl-sgm",
            "sdxl-kohya_lycoris_lora",
            "sdxl-kohya_kohya_lora",
            "sdxl-kohya_but_diffusers_lycoris_lora",
            "sdxl-kohya_but_diffusers_kohya_lora",
            "sdxl-kohya_but_diffusers",
            "sdxl-kohya",
            "sdxl-diffusers_unet_only",
            "sd3-comfyui",
            "sd1-supermerger_blocks",
            "sd1-ldm",
            "sd1-kohya_lycoris_lora",
            "sd1-kohya_kohya_lora",
            "sd1-kohya",
            "flux-flux",
        ]
    );
}

#[test]
fn inference_candidates_skip_the_lora_configs_only_when_no_key_could_match_them() {
    // Every key and alias of a derived config has the prefix `candidates_for` looks for.
    for config in list().iter().filter(|c| c.id.ends_with("_lora")) {
        for (key, meta) in config.keys() {
            assert!(super::lycoris::has_lycoris_prefix(key), "{key}");
            assert!(meta.aliases.iter().all(|a| super::lycoris::has_lycoris_prefix(a)), "{key}");
        }
    }
    let ids = |keys: &[&str]| {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        candidates_for(&keys).iter().map(|c| c.id.clone()).collect::<Vec<_>>()
    };
    let plain = ids(&["model.diffusion_model.out.0.weight"]);
    assert!(plain.iter().all(|id| !id.ends_with("_lora")) && plain.contains(&"sdxl-sgm".to_string()));
    let lora = ids(&["lora_unet_out_0.lora_up.weight"]);
    let all: Vec<String> = list().iter().map(|c| c.id.clone()).collect();
    assert_eq!(lora, all);
    assert!(!super::lycoris::has_lycoris_prefix("lorax.weight"));
}
