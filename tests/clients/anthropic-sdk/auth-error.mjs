// A wrong key: the SDK raises its AuthenticationError with the server's words.
import Anthropic from '@anthropic-ai/sdk';
import { client, report, MODEL } from './common.mjs';

await report(async () => {
  try {
    await client({ apiKey: 'not-the-token' }).messages.create({
      model: MODEL,
      max_tokens: 8,
      messages: [{ role: 'user', content: 'Hello?' }],
    });
  } catch (error) {
    return {
      authentication_error: error instanceof Anthropic.AuthenticationError,
      name: error.constructor.name,
      status: error.status,
      type: error.type ?? error.error?.error?.type,
      message: error.error?.error?.message,
      request_id: error.requestID,
    };
  }
  throw new Error('the request with a wrong key succeeded');
});
