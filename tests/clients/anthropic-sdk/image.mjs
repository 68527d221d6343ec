// An image block, as an application sends a screenshot: a 2x2 PNG in base64.
import { client, report, MODEL } from './common.mjs';

// A 2x2 red PNG, written out here so that the script needs nothing else.
const PNG =
  'iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg==';

await report(async () => {
  const message = await client().messages.create({
    model: MODEL,
    max_tokens: 8,
    messages: [
      {
        role: 'user',
        content: [
          { type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } },
          { type: 'text', text: 'What is in this image?' },
        ],
      },
    ],
  });
  const counted = await client().messages.countTokens({
    model: MODEL,
    messages: [
      {
        role: 'user',
        content: [
          { type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } },
          { type: 'text', text: 'What is in this image?' },
        ],
      },
    ],
  });
  return { stop_reason: message.stop_reason, usage: message.usage, counted: counted.input_tokens };
});
