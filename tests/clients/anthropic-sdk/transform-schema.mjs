// The SDK's own transformJSONSchema (what messages.parse and the strict-tool
// helpers send) on each JSON schema of the JSON array read from stdin; prints
// the transformed schemas as one JSON array. Needs no daemon.
import { readFileSync } from 'node:fs';
import { transformJSONSchema } from '@anthropic-ai/sdk/lib/transform-json-schema';

const schemas = JSON.parse(readFileSync(0, 'utf8'));
console.log(JSON.stringify(schemas.map((schema) => transformJSONSchema(schema))));
