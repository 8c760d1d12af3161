// transformers.js fills masks from a model folder made by `mlmtune export`, offline; prints one JSON line per text.
// Usage: node fill.mjs MODEL_DIR TOP_K DTYPE TEXT...   (DTYPE fp32 reads onnx/model.onnx, q8 onnx/model_quantized.onnx)
import path from "node:path";
import { env, pipeline } from "@huggingface/transformers";

const [dir, topK, dtype, ...texts] = process.argv.slice(2);
env.allowRemoteModels = false; // never the network: the folder is all there is
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(dir));
const fill = await pipeline("fill-mask", path.basename(path.resolve(dir)), { dtype, device: "cpu" });
for (const text of texts) {
  console.log(JSON.stringify(await fill(text, { top_k: Number(topK) })));
}
