// A durable consumer of an event_projections subscription, with node-postgres (`pg`).
//
//     node consumer.js CONNINFO SUBSCRIPTION MEMBER OUTFILE UNTIL [DELAY_MS]
//
// Polls its member's share of the log, writes each event to OUTFILE ("position stream
// stream_position", one line each, written before the next), then acknowledges the batch. It stops
// once it has acknowledged everything up to global position UNTIL. Killed at any point, a new run
// continues after the last acknowledgement: at least once, each stream in order.
'use strict';
const fs = require('fs');
const { Client } = require('pg');

// A URL (postgres://...) or libpq's key=value form ("host=... port=... dbname=...").
function connectionConfig(conninfo) {
  if (/^postgres(ql)?:\/\//.test(conninfo)) return { connectionString: conninfo };
  const names = { dbname: 'database', connect_timeout: 'connectionTimeoutMillis' };
  const config = {};
  for (const pair of conninfo.trim().split(/\s+/)) {
    const [key, ...value] = pair.split('=');
    config[names[key] || key] = key === 'connect_timeout' ? Number(value.join('=')) * 1000 : value.join('=');
  }
  return config;
}

async function run(conninfo, subscription, member, outfile, until, delayMs) {
  const client = new Client(connectionConfig(conninfo));
  await client.connect();
  // bigint columns arrive as strings: positions are compared as BigInt.
  try {
    for (;;) {
      const { rows } = await client.query(
        "SELECT global_position, stream_id, stream_position FROM ep_poll($1, $2, max_count => 50, wait => '1 second')",
        [subscription, member]);
      if (rows.length === 0) {
        const { rows: [status] } = await client.query(
          'SELECT position FROM ep.subscription_status WHERE subscription = $1 AND member = $2',
          [subscription, member]);
        if (BigInt(status.position) >= BigInt(until)) return;
        continue;
      }
      for (const e of rows) {
        fs.appendFileSync(outfile, `${e.global_position} ${e.stream_id} ${e.stream_position}\n`); // the "processing"
        if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
      }
      await client.query('SELECT ep_ack($1, $2, $3)', [subscription, member, rows[rows.length - 1].global_position]);
    }
  } finally {
    await client.end();
  }
}

const [conninfo, subscription, member, outfile, until, delay] = process.argv.slice(2);
run(conninfo, subscription, Number(member), outfile, until, Number(delay || 0)).catch((e) => {
  console.error(e.message);
  process.exit(1);
});
