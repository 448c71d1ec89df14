// Contract tests: the real `openai` npm package against a running tollgate (see tests/contract.rs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set; run these tests through \`cargo test --test contract\``);
  return v;
}

const baseURL = env('TOLLGATE_BASE_URL');
const apiKey = env('TOLLGATE_API_KEY');
const expect = JSON.parse(env('TOLLGATE_CONTRACT_EXPECT'));
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });
const HELLO = [{ role: 'user', content: 'hi' }];
const TOOLS = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } },
  { type: 'function', function: { name: 'get_time', description: 'Time in a zone',
    parameters: { type: 'object', properties: { tz: { type: 'string' } }, required: ['tz'] } } },
];

async function rejectsWith(promise, cls, status) {
  let err;
  try {
    await promise;
  } catch (e) {
    err = e;
  }
  assert.ok(err, `expected ${cls.name}, got success`);
  assert.ok(err instanceof cls, `expected ${cls.name}, got ${err?.constructor?.name}: ${err?.message}`);
  assert.equal(err.status, status);
  return err;
}

test('non-streamed chat', async () => {
  const r = await client.chat.completions.create({ model: expect.model, messages: HELLO });
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.model, expect.model);
  const c = r.choices[0];
  assert.equal(c.finish_reason, 'stop');
  assert.equal(c.message.content, expect.plain.content);
  assert.equal(c.message.reasoning_content, expect.plain.reasoning);
  assert.equal(r.usage.prompt_tokens, expect.plain.usage.prompt_tokens);
  assert.equal(r.usage.prompt_tokens_details.cached_tokens, expect.plain.usage.cached_tokens);
});

test('streamed chat with reasoning_content', async () => {
  const stream = await client.chat.completions.create({ model: expect.model, messages: HELLO, stream: true });
  let reasoning = '';
  let content = '';
  let finish = null;
  const ids = new Set();
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    assert.equal(chunk.model, expect.model);
    ids.add(chunk.id);
    for (const choice of chunk.choices) {
      reasoning += choice.delta.reasoning_content ?? '';
      content += choice.delta.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
  }
  assert.equal(reasoning, expect.plain.reasoning);
  assert.equal(content, expect.plain.content);
  assert.equal(finish, 'stop');
  assert.equal(ids.size, 1);
});

test('tool call round trip', async () => {
  const messages = [{ role: 'user', content: 'Weather and time in Paris?' }];
  const r1 = await client.chat.completions.create({ model: expect.model, messages, tools: TOOLS });
  const msg = r1.choices[0].message;
  assert.equal(r1.choices[0].finish_reason, 'tool_calls');
  const want = expect.tool_turn.tool_calls;
  assert.deepEqual(msg.tool_calls.map((c) => c.id), want.map((w) => w.id));
  assert.deepEqual(msg.tool_calls.map((c) => c.function.name), want.map((w) => w.name));
  assert.deepEqual(msg.tool_calls.map((c) => JSON.parse(c.function.arguments)), want.map((w) => JSON.parse(w.arguments)));
  assert.equal(msg.reasoning_content, expect.tool_turn.reasoning);
  messages.push(msg);
  for (const c of msg.tool_calls) messages.push({ role: 'tool', tool_call_id: c.id, content: '18C, sunny' });
  const r2 = await client.chat.completions.create({ model: expect.model, messages, tools: TOOLS });
  assert.equal(r2.choices[0].finish_reason, 'stop');
  assert.equal(r2.choices[0].message.content, expect.after_tool.content);
});

test('streamed tool call round trip', async () => {
  const messages = [{ role: 'user', content: 'Weather and time in Paris?' }];
  const stream = await client.chat.completions.create({ model: expect.model, messages, tools: TOOLS, stream: true });
  const calls = new Map();
  let reasoning = '';
  let finish = null;
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      reasoning += choice.delta.reasoning_content ?? '';
      finish = choice.finish_reason ?? finish;
      for (const tc of choice.delta.tool_calls ?? []) {
        if (!calls.has(tc.index)) calls.set(tc.index, { id: null, name: null, arguments: '' });
        const e = calls.get(tc.index);
        if (tc.id) {
          assert.equal(e.id, null, 'tool call id repeated in a later fragment');
          e.id = tc.id;
        }
        if (tc.function?.name) e.name = tc.function.name;
        if (tc.function?.arguments) e.arguments += tc.function.arguments;
      }
    }
  }
  assert.equal(finish, 'tool_calls');
  assert.equal(reasoning, expect.tool_turn.reasoning);
  const idx = [...calls.keys()].sort((a, b) => a - b);
  const want = expect.tool_turn.tool_calls;
  assert.deepEqual(idx, want.map((_, i) => i));
  assert.deepEqual(idx.map((i) => calls.get(i).id), want.map((w) => w.id));
  assert.deepEqual(idx.map((i) => calls.get(i).arguments), want.map((w) => w.arguments));
  messages.push({
    role: 'assistant',
    reasoning_content: reasoning,
    tool_calls: idx.map((i) => ({ id: calls.get(i).id, type: 'function',
      function: { name: calls.get(i).name, arguments: calls.get(i).arguments } })),
  });
  for (const i of idx) messages.push({ role: 'tool', tool_call_id: calls.get(i).id, content: '18C' });
  const r2 = await client.chat.completions.create({ model: expect.model, messages, tools: TOOLS });
  assert.equal(r2.choices[0].message.content, expect.after_tool.content);
});

test('stream_options.include_usage', async () => {
  const stream = await client.chat.completions.create({
    model: expect.model, messages: HELLO, stream: true, stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.prompt_tokens, expect.plain.usage.prompt_tokens);
  assert.equal(last.usage.completion_tokens, expect.plain.usage.completion_tokens);
  assert.equal(last.usage.prompt_tokens_details.cached_tokens, expect.plain.usage.cached_tokens);
  for (const c of chunks.slice(0, -1)) assert.ok(c.usage == null, 'usage on a chunk other than the last');
});

test('400 invalid temperature', async () => {
  const err = await rejectsWith(
    client.chat.completions.create({ model: expect.model, messages: HELLO, temperature: 3 }),
    OpenAI.BadRequestError, 400);
  assert.equal(err.param, 'temperature');
});

test('401 bad key', async () => {
  const bad = new OpenAI({ baseURL, apiKey: 'sk-wrong', maxRetries: 0, timeout: 30_000 });
  await rejectsWith(bad.chat.completions.create({ model: expect.model, messages: HELLO }),
    OpenAI.AuthenticationError, 401);
});

test('404 unknown model', async () => {
  const err = await rejectsWith(
    client.chat.completions.create({ model: 'no-such-model-xyz', messages: HELLO }),
    OpenAI.NotFoundError, 404);
  assert.equal(err.code, 'model_not_found');
});

test('413 body too large', async () => {
  const big = 'x'.repeat(expect.max_body_bytes + 1024);
  const err = await rejectsWith(
    client.chat.completions.create({ model: expect.model, messages: [{ role: 'user', content: big }] }),
    OpenAI.APIError, 413);
  assert.equal(err.constructor, OpenAI.APIError);
});

test('upstream 4xx passthrough', async () => {
  const err = await rejectsWith(
    client.chat.completions.create({ model: expect.models.upstream_400, messages: HELLO }),
    OpenAI.BadRequestError, 400);
  assert.ok(err.message.includes(expect.upstream_400_message), err.message);
});

test('upstream 429 passthrough', async () => {
  await rejectsWith(client.chat.completions.create({ model: expect.models.upstream_429, messages: HELLO }),
    OpenAI.RateLimitError, 429);
});

test('upstream 500 becomes 502', async () => {
  await rejectsWith(client.chat.completions.create({ model: expect.models.upstream_500, messages: HELLO }),
    OpenAI.InternalServerError, 502);
});

test('upstream timeout becomes 504', async () => {
  await rejectsWith(client.chat.completions.create({ model: expect.models.upstream_slow, messages: HELLO }),
    OpenAI.InternalServerError, 504);
});

test('mid-stream upstream failure raises', async () => {
  const stream = await client.chat.completions.create({
    model: expect.models.midstream_error, messages: HELLO, stream: true,
  });
  await assert.rejects(async () => {
    for await (const _ of stream) { /* drain */ }
  }, OpenAI.APIError);
});
