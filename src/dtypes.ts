/** Dtype names accepted by options and `cast`, and the typed arrays tensors come back in. */

/** safetensors names and sd-mecha's torch names; case-insensitive at run time. */
export type DtypeName =
  | 'f16'
  | 'bf16'
  | 'f32'
  | 'f64'
  | 'f8_e4m3'
  | 'f8_e5m2'
  | 'float16'
  | 'bfloat16'
  | 'float32'
  | 'float64'
  | 'float8_e4m3fn'
  | 'float8_e5m2'
  | 'F16'
  | 'BF16'
  | 'F32'
  | 'F64'
  | 'F8_E4M3'
  | 'F8_E5M2'

/** The dtype names a safetensors header uses. */
export type SafetensorsDtype =
  | 'BOOL'
  | 'U8'
  | 'I8'
  | 'F8_E4M3'
  | 'F8_E5M2'
  | 'F8_E8M0'
  | 'F8_E4M3FNUZ'
  | 'F8_E5M2FNUZ'
  | 'I16'
  | 'U16'
  | 'F16'
  | 'BF16'
  | 'I32'
  | 'U32'
  | 'F32'
  | 'C64'
  | 'F64'
  | 'I64'
  | 'U64'
  | 'F4'
  | 'F6_E2M3'
  | 'F6_E3M2'

/** The typed arrays a tensor's `data` can be (see `TensorArrays` for which dtype uses which). */
export type TensorData =
  | Float32Array
  | Float64Array
  | Uint16Array
  | Int16Array
  | Int8Array
  | Uint8Array
  | Int32Array
  | Uint32Array
  | BigInt64Array
  | BigUint64Array

/** The typed array each dtype's values come in (f16 and bf16 as raw bits; fp8 and smaller as bytes). */
export interface TensorArrays {
  F32: Float32Array
  F64: Float64Array
  F16: Uint16Array
  BF16: Uint16Array
  U16: Uint16Array
  I8: Int8Array
  I16: Int16Array
  I32: Int32Array
  U32: Uint32Array
  I64: BigInt64Array
  U64: BigUint64Array
}

/** A tensor of one dtype: `data` is the typed array for that dtype. */
export interface TensorOf<D extends SafetensorsDtype> {
  dtype: D
  shape: number[]
  data: D extends keyof TensorArrays ? TensorArrays[D] : Uint8Array
}

/**
 * A tensor, discriminated by `dtype`: checking `t.dtype === 'F32'` makes `t.data` a
 * `Float32Array`. f16 and bf16 come as raw `Uint16Array` bits; `toFloat32` decodes any of them.
 */
export type Tensor = { [D in SafetensorsDtype]: TensorOf<D> }[SafetensorsDtype]

/** A tensor from a dtype and its little-endian bytes (viewed, not copied, when aligned). */
export function tensorFromBytes(dtype: SafetensorsDtype, shape: number[], bytes: Uint8Array): Tensor {
  // typedArray picks the array type TensorArrays names for `dtype`.
  return { dtype, shape, data: typedArray(dtype, bytes) } as Tensor
}

type ArrayCtor = {
  new (buffer: ArrayBufferLike, byteOffset: number, length: number): TensorData
  BYTES_PER_ELEMENT: number
}

const arrayFor: Partial<Record<SafetensorsDtype, ArrayCtor>> = {
  F32: Float32Array,
  F64: Float64Array,
  F16: Uint16Array,
  BF16: Uint16Array,
  I8: Int8Array,
  I16: Int16Array,
  U16: Uint16Array,
  I32: Int32Array,
  U32: Uint32Array,
  I64: BigInt64Array,
  U64: BigUint64Array,
}

/** Views raw little-endian bytes as the typed array for `dtype` (copying only if misaligned). */
export function typedArray(dtype: SafetensorsDtype, bytes: Uint8Array): TensorData {
  const Ctor = arrayFor[dtype]
  if (!Ctor) return bytes
  const size = Ctor.BYTES_PER_ELEMENT
  const aligned = bytes.byteOffset % size === 0 ? bytes : new Uint8Array(bytes)
  return new Ctor(aligned.buffer, aligned.byteOffset, aligned.byteLength / size)
}

function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1
  const exp = (h >> 10) & 0x1f
  const frac = h & 0x3ff
  if (exp === 0) return sign * frac * 2 ** -24
  if (exp === 31) return frac ? NaN : sign * Infinity
  return sign * (1 + frac / 1024) * 2 ** (exp - 15)
}

/** The tensor's values as f32 (decoding f16/bf16 bits; integers converted). */
export function toFloat32(tensor: Tensor): Float32Array {
  const { dtype, data } = tensor
  if (data instanceof Float32Array) return data
  const out = new Float32Array(data.length)
  if (dtype === 'F16') {
    for (let i = 0; i < data.length; i++) out[i] = f16ToF32(data[i] as number)
  } else if (dtype === 'BF16') {
    const bits = new Uint32Array(out.buffer)
    for (let i = 0; i < data.length; i++) bits[i] = (data[i] as number) << 16
  } else if (arrayFor[dtype] || dtype === 'U8' || dtype === 'BOOL') {
    for (let i = 0; i < data.length; i++) out[i] = Number(data[i])
  } else {
    throw new TypeError(
      `toFloat32: ${dtype} values are not decoded in JavaScript; merge with outputDtype 'f32' instead`,
    )
  }
  return out
}
