// messages.parse with a zod schema whose constraints the SDK cannot send:
// it moves them into descriptions ({maxLength: 24}) and validates the reply
// against the zod schema itself, so every reply must meet them.
import { zodOutputFormat } from '@anthropic-ai/sdk/helpers/zod';
import { z } from 'zod';
import { client, report, wire, MODEL } from './common.mjs';

const Label = z.object({
  label: z.string().max(24),
  rating: z.number().int().min(1).max(10),
  code: z.string().regex(/^[a-z]{1,8}, [0-9]{2}$/),
});

await report(async () => {
  const anthropic = client();
  const parsed = [];
  for (let i = 0; i < 10; i++) {
    const message = await anthropic.messages.parse({
      model: MODEL,
      max_tokens: 96,
      temperature: 1.0,
      messages: [{ role: 'user', content: 'Label this ticket and rate it.' }],
      output_config: { format: zodOutputFormat(Label) },
    });
    parsed.push(message.parsed_output);
  }
  return { parsed, sent: wire[0].body.output_config.format.schema };
});
