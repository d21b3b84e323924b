// MQTT.js 5 reading the topic aliases vigil puts on deliveries.
// Usage: node aliases.mjs URL TOPIC_PREFIX
// Connects accepting 4 topic aliases, subscribes to PREFIX/#, publishes to PREFIX/a at QoS
// 0, 1 and 2, then to PREFIX/b and PREFIX/a at QoS 1, each once the one before has come back.
// MQTT.js emits an incoming QoS 2 message only when the broker's PUBREL arrives
// (lib/handlers/pubrel.js), so a QoS 1 message delivered right behind it is emitted first, with
// any broker. Prints one JSON line per message received (the topic MQTT.js resolved and the
// alias the packet carried) and DONE, or exits 1 with the reason.
import mqtt from "mqtt";

const [url, prefix] = process.argv.slice(2);
const client = mqtt.connect(url, {
  clientId: `mqttjs-alias-${process.pid}`,
  protocolVersion: 5,
  connectTimeout: 5000,
  reconnectPeriod: 0,
  properties: { topicAliasMaximum: 4 },
});
const sends = [["a", 0], ["a", 1], ["a", 2], ["b", 1], ["a", 1]];
let got = 0;
let received = () => {};
const fail = (why) => { console.error(`FAIL ${why}`); process.exit(1); };
setTimeout(() => fail(`timeout after ${got} messages`), 15000);
client.on("error", (e) => fail(`error ${e.message}`));
client.on("message", (topic, payload, packet) => {
  console.log(JSON.stringify({ topic, payload: payload.toString(), alias: packet.properties?.topicAlias ?? null }));
  received();
  if (++got === sends.length) {
    console.log("DONE");
    setTimeout(() => client.end(false, () => process.exit(0)), 100);
  }
});
client.on("connect", async () => {
  await client.subscribeAsync(`${prefix}/#`, { qos: 2 });
  for (const [i, [t, qos]] of sends.entries()) {
    const back = new Promise((resolve) => { received = resolve; });
    await client.publishAsync(`${prefix}/${t}`, `m${i}`, { qos });
    await back;
  }
});
