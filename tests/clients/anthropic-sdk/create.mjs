// messages.create, not streamed.
import { client, report, MODEL } from './common.mjs';

await report(async () => {
  const message = await client().messages.create({
    model: MODEL,
    max_tokens: 8,
    messages: [{ role: 'user', content: 'Say hello.' }],
  });
  return {
    id: message.id,
    type: message.type,
    role: message.role,
    content: message.content,
    stop_reason: message.stop_reason,
    usage: message.usage,
    request_id: message._request_id,
  };
});
