// Streams one generation from llmrpc's public gRPC port (the tokenizer service).
//
// The proto is loaded at run time from the repository's protos/ folder, so there is
// no code generation step:
//
//   cd examples/node && npm install
//   node generate.js "Write a haiku about gRPC." --target 127.0.0.1:50051 --max-tokens 32
//
// Text goes to stdout as it arrives; the finish reason and usage go to stderr.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');

function parseArgs(argv) {
  const args = { prompt: 'Write a haiku about gRPC.', target: '127.0.0.1:50051', maxTokens: 64,
                 temperature: 0, chat: true };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--target') args.target = argv[++i];
    else if (a === '--max-tokens') args.maxTokens = parseInt(argv[++i], 10);
    else if (a === '--temperature') args.temperature = parseFloat(argv[++i]);
    else if (a === '--text') args.chat = false;  // raw text completion instead of a chat turn
    else args.prompt = a;
  }
  return args;
}

function loadGeneration() {
  const definition = protoLoader.loadSync('llmrpc/v1/generation.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true,   // field names as in the .proto (max_tokens, not maxTokens)
    longs: String,    // uint64 seed
    enums: String,    // finish_reason as its name
    defaults: false,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).llmrpc.v1.Generation;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const Generation = loadGeneration();
  const client = new Generation(args.target, grpc.credentials.createInsecure());
  const request = {
    sampling: { max_tokens: args.maxTokens, temperature: args.temperature },
  };
  if (args.chat) request.chat = { messages: [{ role: 'user', content: args.prompt }] };
  else request.text = args.prompt;

  const call = client.Generate(request);
  call.on('data', (response) => {
    process.stdout.write(response.text);
    if (response.finish_reason && response.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
      const u = response.usage || {};
      process.stderr.write(`\n[${response.finish_reason}] prompt_tokens=${u.prompt_tokens} ` +
                           `completion_tokens=${u.completion_tokens}\n`);
    }
  });
  call.on('error', (err) => {
    process.stderr.write(`\nerror: ${err.code} ${err.details}\n`);
    process.exitCode = 1;
  });
  call.on('end', () => client.close());
}

main();
