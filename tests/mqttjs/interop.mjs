// MQTT.js against vigil: the same client code browsers run, here in Node.
// Usage: node interop.mjs URL TOPIC_PREFIX [PROTOCOL_VERSION]
// Connects (MQTT 3.1.1, or 5 when PROTOCOL_VERSION is 5), subscribes at QoS 2 to PREFIX/#
// (in v5 with Subscription Identifier 42), publishes one message at each QoS to PREFIX/js/<qos>
// and waits for: its own three messages back (QoS = min(pub, sub)), and three messages the Rust
// test publishes with mosquitto_pub to PREFIX/tcp/<qos> after this script prints READY.
// Prints one JSON line per received message (in v5 with the Subscription Identifiers it
// carried) and DONE, or exits 1 with the reason.
import mqtt from "mqtt";

const [url, prefix, version = "4"] = process.argv.slice(2);
const v5 = version === "5";
const opts = { clientId: `mqttjs-${process.pid}`, protocolVersion: v5 ? 5 : 4, connectTimeout: 5000, reconnectPeriod: 0 };
const client = mqtt.connect(url, opts);
const got = [];
const fail = (why) => { console.error(`FAIL ${why}`); process.exit(1); };
setTimeout(() => fail(`timeout; got ${JSON.stringify(got)}`), 15000);
client.on("error", (e) => fail(`error ${e.message}`));
client.on("message", (topic, payload, packet) => {
  const m = { topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain };
  if (v5) m.sid = [packet.properties?.subscriptionIdentifier ?? []].flat();
  got.push(m);
  console.log(JSON.stringify(got[got.length - 1]));
  if (got.length === 6) {
    console.log("DONE");
    // MQTT.js emits a QoS 2 message before it writes the PUBCOMP: let that go out before
    // DISCONNECT (nothing may follow a DISCONNECT).
    setTimeout(() => client.end(false, () => process.exit(0)), 100);
  }
});
client.on("connect", () => {
  const sub = v5 ? { qos: 2, properties: { subscriptionIdentifier: 42 } } : { qos: 2 };
  client.subscribe(`${prefix}/#`, sub, (err, granted) => {
    if (err) fail(`subscribe ${err.message}`);
    if (granted[0].qos !== 2) fail(`granted ${JSON.stringify(granted)}`);
    let pending = 3;
    for (const qos of [0, 1, 2]) {
      client.publish(`${prefix}/js/${qos}`, `js${qos}`, { qos }, (e) => {
        if (e) fail(`publish ${e.message}`);
        if (--pending === 0) console.log("READY");
      });
    }
  });
});
