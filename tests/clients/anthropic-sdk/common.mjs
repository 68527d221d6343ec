// Shared by the scripts here: the official TypeScript SDK as an application
// would make it (ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY from the
// environment), with a fetch that only watches what goes over the wire.
import Anthropic from '@anthropic-ai/sdk';

export const MODEL = process.env.PENSIEVE_MODEL ?? 'claude-sonnet-4-5';

/** The JSON bodies sent to /v1/messages and the statuses that came back, in order. */
export const wire = [];

export function client(options = {}) {
  return new Anthropic({
    maxRetries: 0,
    fetch: async (url, init) => {
      const response = await fetch(url, init);
      if (String(url).includes('/v1/messages') && init?.body) {
        wire.push({ body: JSON.parse(init.body), status: response.status });
      }
      return response;
    },
    ...options,
  });
}

export const WEATHER = {
  name: 'get_weather',
  description: 'The weather in a city.',
  input_schema: {
    type: 'object',
    properties: { city: { type: 'string', maxLength: 12 } },
    required: ['city'],
    additionalProperties: false,
  },
};

/** Print the scenario's findings as one JSON line; a failure prints what it was and exits 1. */
export async function report(scenario) {
  try {
    console.log(JSON.stringify(await scenario()));
  } catch (error) {
    console.log(
      JSON.stringify({
        error: {
          name: error?.constructor?.name,
          status: error?.status,
          message: String(error?.message ?? error),
          body: error?.error,
        },
      }),
    );
    process.exitCode = 1;
  }
}
