/** The compiled addon (loaded by napi-rs's generated `index.js`, which picks the platform build). */
import * as binding from '../index.js'

export = binding
