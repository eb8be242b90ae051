// transformers.js in Node on a `proclip export --format transformers.js` folder, as a user would call it:
//   node classify.mjs <request.json>   (request: {model_dir, image, labels, template, dtype, texts})
// Prints one JSON line: the zero-shot pipeline's answer, the tokenizer's ids for `texts`, the processor's pixel
// values, and CLIPTextModelWithProjection / CLIPVisionModelWithProjection's embeddings.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
    env, pipeline, AutoProcessor, AutoTokenizer, RawImage,
    CLIPTextModelWithProjection, CLIPVisionModelWithProjection,
} from '@huggingface/transformers';

const request = JSON.parse(readFileSync(process.argv[2], 'utf8'));
env.allowRemoteModels = false;  // the folder on disk only, never the Hub
env.localModelPath = path.dirname(path.resolve(request.model_dir)) + path.sep;
const model = path.basename(request.model_dir);
const options = { dtype: request.dtype };

const classifier = await pipeline('zero-shot-image-classification', model, options);
const image = await RawImage.read(request.image);
const scores = await classifier(image, request.labels, { hypothesis_template: request.template });

const tokenizer = await AutoTokenizer.from_pretrained(model);
const encoded = tokenizer(request.texts, { padding: true, truncation: true });
const processor = await AutoProcessor.from_pretrained(model);
const { pixel_values } = await processor(image);
const textModel = await CLIPTextModelWithProjection.from_pretrained(model, options);
const visionModel = await CLIPVisionModelWithProjection.from_pretrained(model, options);
const { text_embeds } = await textModel(encoded);
const { image_embeds } = await visionModel({ pixel_values });

console.log(JSON.stringify({
    scores,
    input_ids: encoded.input_ids.tolist().map((row) => row.map(Number)),
    attention_mask: encoded.attention_mask.tolist().map((row) => row.map(Number)),
    padding_side: tokenizer.padding_side,
    pixel_values: { dims: pixel_values.dims, data: Array.from(pixel_values.data) },
    text_embeds: text_embeds.tolist(),
    image_embeds: image_embeds.tolist(),
}));
