// messages.stream: the events as they come, then the accumulated message.
import { client, report, MODEL } from './common.mjs';

await report(async () => {
  const stream = client().messages.stream({
    model: MODEL,
    max_tokens: 8,
    messages: [{ role: 'user', content: 'Count to three.' }],
  });
  const events = [];
  let text = '';
  stream.on('streamEvent', (event) => events.push(event.type));
  stream.on('text', (delta) => (text += delta));
  const message = await stream.finalMessage();
  return { events, text, final_text: message.content.map((b) => b.text ?? '').join(''), message };
});
