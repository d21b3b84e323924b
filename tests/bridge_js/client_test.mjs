// Node check of examples/browser/vigil-bridge.js against a running vigil bridge.
// Usage: node client_test.mjs ws://HOST:PORT/ws   (after `npm ci` in this directory)
//
// Connects a persistent client A (QoS 2 subscription to a fresh topic prefix) and a clean client
// B, then checks: publishes to itself at QoS 0/1/2 come back decoded (json, utf8, base64); a
// refused publish rejects its Promise; after a force-closed socket A reconnects with the same
// client id, the session is present, unacknowledged QoS 1 and 2 deliveries are re-delivered
// (QoS 1 again with dup, QoS 2 handed over once), publishes made while down go out after the
// reconnect; unsubscribe stops deliveries; a generated client id works.
// Prints OK and exits 0, or prints a FAIL line per failed check and exits 1 (20 s overall
// timeout). VIGIL_BRIDGE_DEBUG=1 logs every frame to stderr.
import WebSocket from "ws";
import { isDeepStrictEqual } from "node:util";
import { VigilBridge } from "../../examples/browser/vigil-bridge.js";

const url = process.argv[2];
const fail = (why) => {
  console.error(`FAIL ${why}`);
  process.exit(1);
};
if (!url) fail("usage: node client_test.mjs ws://HOST:PORT/ws");
setTimeout(() => fail(`timeout (20 s); last step: ${step}${failed()}`), 20000);
process.on("unhandledRejection", (e) => fail(`unhandled rejection in ${step}: ${e?.stack ?? e}`));

let step = "start";
const run = `${process.pid}-${Date.now().toString(36)}`;
const prefix = `bridgejs/${run}`;
// A failed check is reported and the run goes on (so one run shows every problem); the exit
// status is 1 if any failed.
const failures = [];
const check = (ok, what) => {
  if (!ok) {
    failures.push(`${step}: ${what}`);
    console.error(`FAIL ${step}: ${what}`);
  }
};
const failed = () => (failures.length ? `; earlier failures: ${failures.join(" | ")}` : "");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Records a client's messages; waitFor() resolves on the first one matching. */
function recorder(bridge) {
  const log = [];
  const waiters = [];
  bridge.on("message", (topic, payload, meta) => {
    const m = { topic, payload, meta };
    log.push(m);
    for (const w of [...waiters]) {
      if (w.pred(m)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  return {
    log,
    waitFor(pred, what, ms = 5000) {
      const seen = log.find(pred);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve) => {
        const w = { pred, resolve };
        waiters.push(w);
        setTimeout(() => {
          if (waiters.includes(w)) fail(`${step}: no message ${what} within ${ms} ms${failed()}`);
        }, ms).unref();
      });
    },
    count: (topic) => log.filter((m) => m.topic === topic).length,
  };
}

// VIGIL_BRIDGE_DEBUG=1 logs every frame to stderr.
const debug = !!process.env.VIGIL_BRIDGE_DEBUG;
let sockets = 0;
class TracedWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    const n = ++sockets;
    this._n = n;
    if (debug) this.on("message", (d) => console.error(`${n} < ${d}`));
    if (debug) this.on("close", (code, reason) => console.error(`${n} closed ${code} ${reason}`));
  }
  send(data, ...rest) {
    if (debug) console.error(`${this._n} > ${data}`);
    super.send(data, ...rest);
  }
}

const opts = { WebSocket: TracedWebSocket, reconnectMin: 50, reconnectMax: 400, connectTimeout: 5000 };
const aId = `bridgejs-a-${run}`;
const a = new VigilBridge(url, { ...opts, clientId: aId, clean: false, keepAlive: 30 });
const b = new VigilBridge(url, { ...opts, clientId: `bridgejs-b-${run}` });
const states = [];
a.on("state", (s) => states.push(s));
const connacks = [];
a.on("connect", (c) => connacks.push(c));
const errors = [];
a.on("error", (e) => errors.push(e));
const am = recorder(a);

step = "connect";
const connack = await a.connect();
check(connack.ok === true && connack.protocol === 1, `connack ${JSON.stringify(connack)}`);
check(connack.client_id === aId, `client_id ${connack.client_id}`);
check(a.state === "connected", `state ${a.state}`);
await b.connect();

step = "subscribe";
const results = await a.subscribe(`${prefix}/#`, 2);
check(isDeepStrictEqual(results, [{ filter: `${prefix}/#`, qos: 2 }]), `suback ${JSON.stringify(results)}`);
check((await a.ping()) >= 0, "ping");

step = "publish to itself";
const jsonValue = { n: 1, s: "x", list: [true, null, 2.5] };
const text = "héllo, wörld";
const bytes = new Uint8Array([0, 1, 2, 127, 128, 254, 255]);
await Promise.all([
  a.publish(`${prefix}/self/0`, jsonValue, { qos: 0 }),
  a.publish(`${prefix}/self/1`, text, { qos: 1 }),
  a.publish(`${prefix}/self/2`, bytes, { qos: 2 }),
]);
const m0 = await am.waitFor((m) => m.topic === `${prefix}/self/0`, "self/0");
check(m0.meta.qos === 0 && m0.meta.encoding === "json", `self/0 meta ${JSON.stringify(m0.meta)}`);
check(isDeepStrictEqual(m0.payload, jsonValue), `self/0 payload ${JSON.stringify(m0.payload)}`);
const m1 = await am.waitFor((m) => m.topic === `${prefix}/self/1`, "self/1");
check(m1.meta.qos === 1 && m1.meta.encoding === "utf8", `self/1 meta ${JSON.stringify(m1.meta)}`);
check(m1.payload === text, `self/1 payload ${JSON.stringify(m1.payload)}`);
const m2 = await am.waitFor((m) => m.topic === `${prefix}/self/2`, "self/2");
check(m2.meta.qos === 2 && m2.meta.encoding === "base64", `self/2 meta ${JSON.stringify(m2.meta)}`);
check(m2.payload instanceof Uint8Array && isDeepStrictEqual([...m2.payload], [...bytes]), `self/2 payload ${m2.payload}`);
// The other encodings at the other QoS levels, with an explicit encoding on the way out.
await Promise.all([
  a.publish(`${prefix}/enc/json`, "[1,2,3]", { qos: 2, encoding: "utf8" }),
  a.publish(`${prefix}/enc/b64`, "//79", { qos: 1, encoding: "base64" }),
  a.publish(`${prefix}/enc/utf8`, "plain text", { qos: 0 }),
]);
const ej = await am.waitFor((m) => m.topic === `${prefix}/enc/json`, "enc/json");
check(ej.meta.encoding === "json" && isDeepStrictEqual(ej.payload, [1, 2, 3]), `enc/json ${JSON.stringify(ej)}`);
const eb = await am.waitFor((m) => m.topic === `${prefix}/enc/b64`, "enc/b64");
check(eb.meta.encoding === "base64" && isDeepStrictEqual([...eb.payload], [255, 254, 253]), `enc/b64 ${eb.payload}`);
const eu = await am.waitFor((m) => m.topic === `${prefix}/enc/utf8`, "enc/utf8");
check(eu.meta.encoding === "utf8" && eu.payload === "plain text", `enc/utf8 ${JSON.stringify(eu)}`);

step = "no subscribers";
// A QoS 1 publish that no subscription matches says so; one that A's subscription matches
// does not.
const nobody = await a.publish(`bridgejs-nobody/${run}`, "x", { qos: 1 });
check(nobody?.noSubscribers === true, `no subscribers: ${JSON.stringify(nobody)}`);
const somebody = await a.publish(`${prefix}/self/1`, "again", { qos: 1 });
check(somebody === undefined, `a subscriber: ${JSON.stringify(somebody)}`);
await am.waitFor((m) => m.topic === `${prefix}/self/1` && m.payload === "again", "self/1 again");

step = "refused publish";
const refused = await a.publish("bridgejs/+/bad", "x", { qos: 1 }).then(
  () => null,
  (e) => e,
);
check(refused && refused.code === "bad_topic", `wildcard topic: ${refused}`);

step = "reconnect re-delivers";
// A's handler force-closes its socket on the first delivery of each of these, before the
// client can acknowledge it: the server must re-deliver them on the resumed session.
const redeliver1 = `${prefix}/redeliver/1`;
const redeliver2 = `${prefix}/redeliver/2`;
const killOnFirst = (topic, payload, meta) => {
  if ((topic === redeliver1 || topic === redeliver2) && am.count(topic) === 1) {
    check(!meta.dup, `first delivery of ${topic} has dup`);
    a.socket.terminate();
  }
};
a.on("message", killOnFirst);
// While A is down: a publish of its own (queued) and one from B (stored in A's session).
let queued = null;
a.on("close", (info) => {
  if (queued === null && info.reconnectIn !== null) {
    queued = a.publish(`${prefix}/queued`, { while: "down" }, { qos: 1 });
    b.publish(`${prefix}/away`, "while away", { qos: 1 });
  }
});
await b.publish(redeliver1, "again", { qos: 1 });
const again = await am.waitFor((m) => m.topic === redeliver1 && m !== am.log.find((x) => x.topic === redeliver1), "redeliver/1 again");
check(again.payload === "again" && again.meta.qos === 1, `redelivered ${JSON.stringify(again)}`);
check(again.meta.dup === true, `re-delivery without dup: ${JSON.stringify(again.meta.frame)}`);
check(connacks.length === 2 && connacks[1].session_present === true, `connacks ${JSON.stringify(connacks)}`);
check(connacks[1].client_id === aId, `reconnected as ${connacks[1].client_id}`);
await queued;
await am.waitFor((m) => m.topic === `${prefix}/queued`, "queued while down");
await am.waitFor((m) => m.topic === `${prefix}/away` && m.payload === "while away", "published while away");

const reconnected = new Promise((resolve) => a.on("connect", resolve));
await b.publish(redeliver2, { once: true }, { qos: 2 });
await am.waitFor((m) => m.topic === redeliver2, "redeliver/2");
await reconnected;
check(connacks.length === 3 && connacks[2].session_present === true, `connacks ${JSON.stringify(connacks)}`);
// A marker published after the reconnect: by the time it arrives, any re-delivery is in.
await b.publish(`${prefix}/marker`, "m", { qos: 2 });
await am.waitFor((m) => m.topic === `${prefix}/marker`, "marker");
await sleep(200);
check(am.count(redeliver2) === 1, `QoS 2 message handed over ${am.count(redeliver2)} times`);
a.off("message", killOnFirst);
const seq = states.join(",");
check(seq === "connecting,connected,reconnecting,connected,reconnecting,connected", `states ${seq}`);

step = "unsubscribe";
const gone = await a.unsubscribe(`${prefix}/#`);
check(isDeepStrictEqual(gone, [`${prefix}/#`]), `unsuback ${JSON.stringify(gone)}`);
await b.publish(`${prefix}/after-unsubscribe`, "no", { qos: 1 });
await sleep(300);
check(am.count(`${prefix}/after-unsubscribe`) === 0, "delivered after unsubscribe");

step = "generated client id";
const c = new VigilBridge(url, opts);
const cc = await c.connect();
check(typeof cc.client_id === "string" && cc.client_id.length > 0 && c.clientId === cc.client_id, `generated ${cc.client_id}`);

step = "disconnect";
await Promise.all([a.disconnect(), b.disconnect(), c.disconnect()]);
check(a.state === "closed" && b.state === "closed" && c.state === "closed", "states after disconnect");
check(
  errors.every((e) => e.code === "bad_topic"),
  `unexpected error frames ${JSON.stringify(errors)}`,
);
if (failures.length > 0) process.exit(1);
console.log("OK");
process.exit(0);
