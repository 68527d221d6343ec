// messages.parse with a zod output format (make clients: structured output).
import { zodOutputFormat } from '@anthropic-ai/sdk/helpers/zod';
import { z } from 'zod';
import { client, report, MODEL } from './common.mjs';

await report(async () => {
  const message = await client().messages.parse({
    model: MODEL,
    max_tokens: 128,
    messages: [{ role: 'user', content: 'Pick a colour and say whether it is warm.' }],
    output_config: { format: zodOutputFormat(z.object({ colour: z.enum(['red', 'green', 'blue']), warm: z.boolean() })) },
  });
  return { parsed: message.parsed_output, stop_reason: message.stop_reason, content: message.content };
});
