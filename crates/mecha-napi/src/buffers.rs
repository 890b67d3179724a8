//! Tensor data handed to JavaScript. napi-rs gives Rust-owned memory to JavaScript as external
//! buffers, and copies it where the runtime refuses those (Electron's V8 memory cage answers
//! `napi_no_external_buffers_allowed`). `MECHA_COPY_BUFFERS=1` forces the copying path, so the
//! test suite runs it on Node too.

use std::sync::OnceLock;

use napi::bindgen_prelude::*;
use napi::sys;

fn copy_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os("MECHA_COPY_BUFFERS").is_some_and(|v| v == "1"))
}

/// Bytes that arrive in JavaScript as a `Buffer` (a merged tensor's data).
pub struct OutputBytes(pub Vec<u8>);

impl TypeName for OutputBytes {
    fn type_name() -> &'static str {
        "Buffer"
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ToNapiValue for OutputBytes {
    unsafe fn to_napi_value(env: sys::napi_env, value: Self) -> Result<sys::napi_value> {
        if !copy_forced() {
            // SAFETY: forwarded as napi-rs's own conversion receives it.
            return unsafe { Buffer::to_napi_value(env, Buffer::from(value.0)) };
        }
        let bytes = value.0;
        let mut data = std::ptr::null_mut();
        let mut result = std::ptr::null_mut();
        // SAFETY: `bytes` outlives the call, which copies `len` bytes from it.
        check_status!(
            unsafe { sys::napi_create_buffer_copy(env, bytes.len(), bytes.as_ptr().cast(), &mut data, &mut result) },
            "copying a tensor's data into a Buffer"
        )?;
        Ok(result)
    }
}

/// Values that arrive in JavaScript as a `Float32Array` (a JavaScript method's argument).
pub struct F32Values(pub Vec<f32>);

impl TypeName for F32Values {
    fn type_name() -> &'static str {
        "Float32Array"
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ToNapiValue for F32Values {
    unsafe fn to_napi_value(env: sys::napi_env, value: Self) -> Result<sys::napi_value> {
        if !copy_forced() {
            // SAFETY: forwarded as napi-rs's own conversion receives it.
            return unsafe { Float32Array::to_napi_value(env, Float32Array::new(value.0)) };
        }
        let values = value.0;
        let byte_len = std::mem::size_of_val(values.as_slice());
        let mut data: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut buffer = std::ptr::null_mut();
        // SAFETY: a fresh JavaScript-owned ArrayBuffer of `byte_len` bytes, filled from `values`
        // before any JavaScript runs, then viewed as `values.len()` floats.
        unsafe {
            check_status!(
                sys::napi_create_arraybuffer(env, byte_len, &mut data, &mut buffer),
                "allocating a Float32Array"
            )?;
            if byte_len > 0 {
                std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), data.cast::<u8>(), byte_len);
            }
            let mut result = std::ptr::null_mut();
            check_status!(
                sys::napi_create_typedarray(
                    env,
                    sys::TypedarrayType::float32_array,
                    values.len(),
                    buffer,
                    0,
                    &mut result
                ),
                "creating a Float32Array"
            )?;
            Ok(result)
        }
    }
}
